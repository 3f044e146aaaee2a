//! Arrays kept between a thread's training steps.

use std::cell::RefCell;

thread_local! {
    /// Arrays of this thread's earlier steps, kept for its next: a step allocates a few
    /// arrays of the batch's size per layer, and glibc hands freed memory of that size back
    /// to the OS, so that every step paid for fresh pages (a quarter of a small CNN's step).
    static SPARE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static SPARE_INDICES: RefCell<Vec<Vec<usize>>> = const { RefCell::new(Vec::new()) };
}

/// Arrays kept per thread, of each kind, and their total size per kind: a step whose
/// working set is larger allocates the rest afresh. rayon's threads live as long as the
/// process, so this is held for good on each of them.
const SPARE_KEPT: usize = 48;
const SPARE_BYTES: usize = 64 << 20;

/// The spare buffer that fits `len` most tightly, emptied.
fn take_spare<T>(spare: &RefCell<Vec<Vec<T>>>, len: usize) -> Option<Vec<T>> {
    let mut spare = spare.borrow_mut();
    let fit = spare
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i)?;
    let mut v = spare.swap_remove(fit);
    v.clear();
    Some(v)
}

fn keep_spare<T>(spare: &RefCell<Vec<Vec<T>>>, v: Vec<T>) {
    let mut spare = spare.borrow_mut();
    let held: usize = spare.iter().map(Vec::capacity).sum::<usize>() + v.capacity();
    if spare.len() < SPARE_KEPT && v.capacity() > 0 && held * size_of::<T>() <= SPARE_BYTES {
        spare.push(v);
    }
}

/// An empty array with room for `len`, a spare one where one fits.
pub(super) fn empty(len: usize) -> Vec<f32> {
    SPARE
        .with(|s| take_spare(s, len))
        .unwrap_or_else(|| Vec::with_capacity(len))
}

/// `len` zeros, in a spare array where one fits.
pub(super) fn zeros(len: usize) -> Vec<f32> {
    let mut v = empty(len);
    v.resize(len, 0.0);
    v
}

/// An empty index array with room for `len`.
pub(super) fn indices(len: usize) -> Vec<usize> {
    SPARE_INDICES
        .with(|s| take_spare(s, len))
        .unwrap_or_else(|| Vec::with_capacity(len))
}

/// Keeps `v` for a later step.
pub(super) fn spare(v: Vec<f32>) {
    SPARE.with(|s| keep_spare(s, v));
}

/// A copy of `v` in a spare array.
pub(super) fn copy_of(v: &[f32]) -> Vec<f32> {
    let mut c = empty(v.len());
    c.extend_from_slice(v);
    c
}

/// Keeps an index array for a later step.
pub(super) fn spare_indices(v: Vec<usize>) {
    SPARE_INDICES.with(|s| keep_spare(s, v));
}
