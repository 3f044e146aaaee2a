//! Arbitrary bytes as a tensor header and body: the first bytes pick a header (often close
//! to the model's, so the body decoder is reached), the rest is fed to `TensorBodyDecoder`
//! in chunks whose sizes also come from the input. Must never panic, must hand out exactly
//! the announced number of values at contiguous offsets, and must error on any length
//! mismatch.
#![no_main]

use fedpriv_common::model::{ModelSpec, TensorSpec};
use fedpriv_common::wire::{decode_frame, Dtype, TensorBodyDecoder, TensorHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(spec) = ModelSpec::new(vec![
        TensorSpec::new("w", &[7, 3]),
        TensorSpec::new("b", &[3]),
    ]) else {
        return;
    };
    // Half the time a header decoded from the input, else the model's own header.
    let (header, rest) = if mode & 1 == 1 && rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let end = (4 + len).min(rest.len());
        match decode_frame::<TensorHeader>(&rest[..end]) {
            Ok(h) => (h, &rest[end..]),
            Err(_) => return,
        }
    } else {
        (TensorHeader::for_spec(&spec, Dtype::F32), rest)
    };
    let Ok(mut decoder) = TensorBodyDecoder::new(&header, &spec) else {
        return;
    };
    let mut next = 0usize;
    let mut sink = |offset: usize, values: &[f32]| {
        assert_eq!(offset, next);
        next += values.len();
    };
    let mut body = rest;
    let mut step = usize::from(mode >> 1) + 1;
    let mut failed = false;
    while !body.is_empty() {
        let take = step.min(body.len());
        if decoder.feed(&body[..take], &mut sink).is_err() {
            failed = true;
            break;
        }
        body = &body[take..];
        step = step * 5 % 97 + 1;
    }
    let expected = spec.num_values() * 4;
    match (failed, decoder.finish()) {
        (true, _) => assert!(rest.len() > expected),
        (false, Ok(())) => {
            assert_eq!(rest.len(), expected);
            assert_eq!(next, spec.num_values());
        }
        (false, Err(_)) => assert!(rest.len() < expected),
    }
});
