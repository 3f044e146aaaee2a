//! Arbitrary bytes into the control-frame decoders: `frame_len` on the prefix, then
//! `decode_frame` for a tensor header and for a message enum shaped like the protocol's.
//! Must never panic, and must never accept a frame over the cap.
#![no_main]

use fedpriv_common::wire::{
    decode_frame, encode_frame, frame_len, TensorHeader, MAX_CONTROL_FRAME,
};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello {
        name: String,
        version: u32,
    },
    Task {
        round: u64,
        header: TensorHeader,
        weights: Vec<f64>,
    },
    Update {
        round: u64,
        header: TensorHeader,
        norm: f32,
    },
    Bye,
}

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.first_chunk::<4>() {
        if let Ok(len) = frame_len(*prefix) {
            assert!(len <= MAX_CONTROL_FRAME);
        }
    }
    if let Ok(msg) = decode_frame::<Msg>(data) {
        // Whatever decodes re-encodes, and that encoding round-trips byte for byte
        // (compared as bytes: a NaN in the message is not equal to itself).
        let again = encode_frame(&msg).expect("a decoded message re-encodes");
        let msg2 = decode_frame::<Msg>(&again).expect("a re-encoded message decodes");
        assert_eq!(encode_frame(&msg2).ok(), Some(again));
    }
    if let Ok(header) = decode_frame::<TensorHeader>(data) {
        let _ = header.body_len_bytes();
    }
});
