//! One chunk's keystream: the uniform words the sampler in [`super`] turns into noise.
//!
//! AES-256-CTR where the CPU has AES instructions, in two implementations that give the same
//! words (RustCrypto's `aes` over counter blocks where the CPU has VAES with AVX-512, ring's
//! AES-256-GCM over zeros elsewhere), and ChaCha20 (the chunk index as its stream number)
//! where it has none. Which one, and why, is in [`super`]'s documentation. This module only
//! makes words; it knows nothing of Gaussians.

use rand::{Rng, SeedableRng};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::{Generator, NoiseRng, WORDS};

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
pub(super) fn aes_instructions() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("sse2")
}

#[cfg(target_arch = "aarch64")]
pub(super) fn aes_instructions() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) fn aes_instructions() -> bool {
    false
}

/// Which code computes the AES-256-CTR keystream: the same words either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AesImpl {
    /// ring's AES-256-GCM over zeros (256-bit VAES or AES-NI).
    RingGcm,
    /// RustCrypto's `aes` over counter blocks (512-bit VAES where the CPU has AVX-512).
    CounterBlocks,
}

impl AesImpl {
    /// The one measured faster on this kind of CPU.
    pub(super) fn detect() -> Self {
        if vaes_512() {
            Self::CounterBlocks
        } else {
            Self::RingGcm
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn vaes_512() -> bool {
    // `aes` as well: `aes` picks its VAES code on VAES and AVX-512 alone, and would run it
    // on a software key schedule where AES-NI is hidden (a virtual machine can do that).
    std::arch::is_x86_feature_detected!("aes")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn vaes_512() -> bool {
    false
}

/// One chunk's keystream.
pub(super) enum Keystream {
    /// The cipher, the chunk index and the number of the chunk's next message.
    Aes(Box<LessSafeKey>, u64, u32),
    /// The same keystream from counter blocks: the cipher, the chunk index and the number
    /// of the chunk's next message.
    AesBlocks(Box<aes::Aes256Enc>, u64, u32),
    ChaCha(Box<NoiseRng>),
}

impl Keystream {
    pub(super) fn new(generator: Generator, key: [u8; 32], chunk: usize) -> Self {
        match generator {
            Generator::Aes256Ctr => Self::aes(AesImpl::detect(), key, chunk),
            Generator::ChaCha20 => {
                let mut rng = NoiseRng::from_seed(key);
                rng.set_stream(chunk as u64);
                Self::ChaCha(Box::new(rng))
            }
        }
    }

    fn aes(imp: AesImpl, key: [u8; 32], chunk: usize) -> Self {
        match imp {
            AesImpl::RingGcm => {
                // A 32-byte key is what AES-256 takes: this cannot fail.
                let key = UnboundKey::new(&AES_256_GCM, &key).expect("a 256-bit key");
                Self::Aes(Box::new(LessSafeKey::new(key)), chunk as u64, 0)
            }
            AesImpl::CounterBlocks => {
                use aes::cipher::KeyInit;
                Self::AesBlocks(Box::new(aes::Aes256Enc::new(&key.into())), chunk as u64, 0)
            }
        }
    }

    /// The next words of the stream: little-endian u64s of the keystream bytes. For AES
    /// each call is one message of its own (the sampler's calls are all [`WORDS`] long).
    #[inline]
    pub(super) fn fill(&mut self, buf: &mut [u64]) {
        match self {
            Self::Aes(key, chunk, message) => {
                // AES-256-GCM over zeros: its ciphertext is the AES-256-CTR keystream
                // E_K(nonce || 2), E_K(nonce || 3), ... (the tag is not used). The nonce,
                // chunk index and message number, is never repeated under a key.
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&chunk.to_be_bytes());
                nonce[8..].copy_from_slice(&message.to_be_bytes());
                *message = message
                    .checked_add(1)
                    .expect("a chunk reads far fewer than 2^32 messages");
                let bytes = bytemuck::cast_slice_mut::<u64, u8>(buf);
                bytes.fill(0);
                // Fails only for a message beyond GCM's 64 GiB; a failure must never leave
                // the zeros in place, so it stops here.
                let _tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::empty(),
                        bytes,
                    )
                    .expect("a message far below AES-GCM's limit");
                if cfg!(target_endian = "big") {
                    buf.iter_mut().for_each(|w| *w = u64::from_le(*w));
                }
            }
            Self::AesBlocks(cipher, chunk, message) => {
                use aes::cipher::BlockCipherEncrypt;
                // The counter blocks GCM's encryption uses: nonce || 2, nonce || 3, ...,
                // written as word pairs whose bytes in memory are the block's.
                let head = u64::from_ne_bytes(chunk.to_be_bytes());
                let m = message.to_be_bytes();
                let m = u64::from_ne_bytes([m[0], m[1], m[2], m[3], 0, 0, 0, 0]);
                // The u32 block counter must not wrap (GCM's own limit; ring refuses too).
                assert!(
                    buf.len() / 2 < (u32::MAX - 2) as usize,
                    "a message far below AES-GCM's limit"
                );
                // Block k of the message (from 0) is counter block k + 2.
                let tail = |k: usize| m | counter_half(k as u32 + 2);
                *message = message
                    .checked_add(1)
                    .expect("a chunk reads far fewer than 2^32 messages");
                // The sampler's messages take their counters from the table: a plain OR
                // per block that the compiler vectorises. Longer ones go on one by one.
                let table = COUNTER_HALVES.len().min(buf.len() / 2);
                let (front, back) = buf.split_at_mut(2 * table);
                pulp::Arch::new().dispatch(|| counter_blocks(front, head, m));
                for (k, pair) in (table..).zip(back.chunks_exact_mut(2)) {
                    pair[0] = head;
                    pair[1] = tail(k);
                }
                let whole = buf.len() / 2 * 2;
                let bytes = bytemuck::cast_slice_mut::<u64, u8>(&mut buf[..whole]);
                let (blocks, _) = aes::Block::slice_as_chunks_mut(bytes);
                cipher.encrypt_blocks(blocks);
                if whole < buf.len() {
                    // A message that ends mid-block takes the first half of the next block.
                    let mut last = [head, tail(whole / 2)];
                    let bytes = bytemuck::cast_slice_mut::<u64, u8>(&mut last);
                    let (block, _) = aes::Block::slice_as_chunks_mut(bytes);
                    cipher.encrypt_block(&mut block[0]);
                    buf[whole] = last[0];
                }
                if cfg!(target_endian = "big") {
                    buf.iter_mut().for_each(|w| *w = u64::from_le(*w));
                }
            }
            // The same words `next_u64` would return.
            Self::ChaCha(r) => r.fill(buf),
        }
    }
}

/// The counter's half of a counter block's second word: `n` big-endian in the block's last
/// four bytes, the message number's four bytes left zero.
const fn counter_half(n: u32) -> u64 {
    let c = n.to_be_bytes();
    u64::from_ne_bytes([0, 0, 0, 0, c[0], c[1], c[2], c[3]])
}

/// Counter blocks 2, 3, ... of a message into `pairs` (at most [`COUNTER_HALVES`]' worth),
/// their first words `head`, their second `m` with the counter's half. Inlined into each
/// instruction set's build, where the compiler vectorises it.
#[inline(always)]
fn counter_blocks(pairs: &mut [u64], head: u64, m: u64) {
    for (pair, &c) in pairs.chunks_exact_mut(2).zip(&COUNTER_HALVES) {
        pair[0] = head;
        pair[1] = m | c;
    }
}

/// [`counter_half`] of every block of a [`WORDS`]-long message: n = 2, 3, ...
const COUNTER_HALVES: [u64; WORDS / 2] = {
    let mut t = [0u64; WORDS / 2];
    let mut i = 0;
    while i < t.len() {
        t[i] = counter_half(i as u32 + 2);
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn hex64(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect()
    }

    fn hex32(s: &str) -> [u8; 32] {
        hex64(s).try_into().expect("32 bytes")
    }

    #[test]
    fn the_chacha_keystream_is_rand_chachas() {
        // Word for word what rand_chacha's generator gives for the key and stream: the
        // ChaCha20 path is the generator this module always had.
        let mut rng = NoiseRng::from_seed([5; 32]);
        rng.set_stream(7);
        let mut words = [0u64; 1000];
        Keystream::new(Generator::ChaCha20, [5; 32], 7).fill(&mut words);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(*w, rng.next_u64(), "word {i}");
        }
    }

    #[test]
    fn the_aes_keystream_is_aes256_ctr() {
        for imp in [AesImpl::RingGcm, AesImpl::CounterBlocks] {
            // The GCM specification's test case 14 (AES-256, zero key, zero 96-bit IV, one
            // zero block): its ciphertext is the first keystream block, E_K(IV || 2).
            let mut words = [0u64; 2];
            Keystream::aes(imp, [0; 32], 0).fill(&mut words);
            assert_eq!(
                bytemuck::cast_slice::<u64, u8>(&words),
                &hex64("cea7403d4d606b6e074ec5d3baf39d18")[..],
                "{imp:?}"
            );
            // Every block of a message is E_K(chunk || message || n) for n = 2, 3, ...:
            // checked block by block against the bare block cipher (for ring's keystream,
            // an independent implementation).
            use aes::cipher::{BlockCipherEncrypt, KeyInit};
            let key = hex32("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
            let cipher = aes::Aes256::new(&key.into());
            let mut stream = Keystream::aes(imp, key, 5);
            let mut words = vec![0u64; WORDS];
            for message in 0..3u32 {
                stream.fill(&mut words);
                for (n, got) in words.chunks_exact(2).enumerate() {
                    let mut counter = [0u8; 16];
                    counter[..8].copy_from_slice(&5u64.to_be_bytes());
                    counter[8..12].copy_from_slice(&message.to_be_bytes());
                    counter[12..].copy_from_slice(&(n as u32 + 2).to_be_bytes());
                    let mut b = counter.into();
                    cipher.encrypt_block(&mut b);
                    let want: [u8; 16] = b.into();
                    assert_eq!(
                        bytemuck::cast_slice::<u64, u8>(got),
                        &want[..],
                        "{imp:?} message {message} block {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn both_aes_implementations_give_the_same_words() {
        // Whichever this CPU picks, the keystream (and so every noise value) is the same:
        // ring's GCM and RustCrypto's counter blocks, message by message, under several
        // keys and chunks, for whole messages and for lengths that end mid-block.
        for (key, chunk) in [([0u8; 32], 0usize), ([0xa5; 32], 7), ([3; 32], 1 << 20)] {
            let mut ring = Keystream::aes(AesImpl::RingGcm, key, chunk);
            let mut blocks = Keystream::aes(AesImpl::CounterBlocks, key, chunk);
            let mut detected = Keystream::new(Generator::Aes256Ctr, key, chunk);
            for len in [
                WORDS,
                1,
                3,
                0,
                WORDS,
                2 * WORDS + 1,
                2 * WORDS,
                5,
                WORDS - 1,
            ] {
                let (mut a, mut b, mut c) = (vec![0u64; len], vec![0u64; len], vec![0u64; len]);
                ring.fill(&mut a);
                blocks.fill(&mut b);
                detected.fill(&mut c);
                assert_eq!(a, b, "chunk {chunk}, a message of {len} words");
                assert_eq!(a, c, "the detected implementation");
            }
        }
        // Message numbers with every byte set (a chunk never reads this many messages, but
        // each byte of the counter block must land in its place).
        let key = [0x3c; 32];
        let message = 0x0a0b_0c0d;
        for len in [WORDS, 7, WORDS + 1] {
            let mut ring = Keystream::aes(AesImpl::RingGcm, key, 0x0102_0304_0506_0708);
            let mut blocks = Keystream::aes(AesImpl::CounterBlocks, key, 0x0102_0304_0506_0708);
            for k in [&mut ring, &mut blocks] {
                if let Keystream::Aes(_, _, m) | Keystream::AesBlocks(_, _, m) = k {
                    *m = message;
                }
            }
            let (mut a, mut b) = (vec![0u64; len], vec![0u64; len]);
            ring.fill(&mut a);
            blocks.fill(&mut b);
            assert_eq!(a, b, "message {message:#x}, {len} words");
        }
        println!("this CPU's keystream: {:?}", AesImpl::detect());
    }

    #[test]
    fn an_aes_message_may_end_mid_block_and_the_next_one_is_fresh() {
        let (mut four, mut three) = ([0u64; 4], [0u64; 3]);
        Keystream::new(Generator::Aes256Ctr, [8; 32], 2).fill(&mut four);
        let mut stream = Keystream::new(Generator::Aes256Ctr, [8; 32], 2);
        stream.fill(&mut three);
        assert_eq!(three, four[..3]);
        // The next call is the next message (a new nonce), not the rest of this one.
        let mut next = [0u64; 4];
        stream.fill(&mut next);
        assert!(next.iter().all(|w| !four.contains(w)));
    }
}
