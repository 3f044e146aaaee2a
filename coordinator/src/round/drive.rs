//! The loop that feeds a study's engine and carries out its actions, shared by the
//! studies' owner and the simulations.

use fedpriv_common::dp::noise::NoiseSource;

use super::{Action, Input, StudyEngine};

/// Where the values of streamed uploads can be read back from (the network layer's spools):
/// what [`Action::Unfold`] asks for.
pub trait UnfoldSource {
    /// Feeds the first `len` values of `upload` through `feed` as [`Input::Unfold`]s, in
    /// order from offset 0, and says whether all of them could be (false: they cannot be
    /// read back, and the round's aggregate is lost). The upload is done with afterwards.
    fn unfold(&mut self, upload: u64, len: usize, feed: &mut dyn FnMut(Input)) -> bool;
}

/// Feeds `input` to `eng` and carries out everything it leads to, in order: the one loop
/// the coordinator and the simulations share. An [`Action::Unfold`] is answered at once
/// from `spools` (the folded values come back out before any other input reaches the
/// engine), then handed to `act` like every other action; an input `act` returns (the
/// store's [`Input::SpendCommitted`], a site that is gone) is fed back and its actions
/// queued after the ones already waiting. An error from `act` stops the loop: the actions
/// still queued are dropped, and the caller decides what the error means for the study.
pub fn drive<E>(
    eng: &mut StudyEngine,
    input: Input,
    now_ms: u64,
    noise: &mut NoiseSource,
    spools: &mut dyn UnfoldSource,
    mut act: impl FnMut(&mut StudyEngine, Action) -> Result<Option<Input>, E>,
) -> Result<(), E> {
    let mut queue: std::collections::VecDeque<Action> = eng.handle(input, now_ms, noise).into();
    while let Some(action) = queue.pop_front() {
        if let Action::Unfold { upload, len, .. } = &action {
            let upload = *upload;
            let ok = spools.unfold(upload, *len, &mut |input| {
                queue.extend(eng.handle(input, now_ms, noise))
            });
            queue.extend(eng.handle(Input::UnfoldDone { upload, ok }, now_ms, noise));
        }
        if let Some(follow_up) = act(eng, action)? {
            queue.extend(eng.handle(follow_up, now_ms, noise));
        }
    }
    Ok(())
}

/// The simulations' spools: what each upload's chunks carried, kept in memory as the
/// server keeps them on file, answered in pieces unrelated to how the values arrived.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct MemSpools {
    pub(crate) values: std::collections::BTreeMap<u64, Vec<f32>>,
    /// Read-back fails (a damaged spool file).
    pub(crate) broken: bool,
    /// Uploads unfolded so far.
    pub(crate) unfolded: usize,
}

#[cfg(test)]
impl MemSpools {
    /// What the server does before it forwards a chunk: keep it.
    pub(crate) fn spool(&mut self, upload: u64, values: &[f32]) {
        self.values
            .entry(upload)
            .or_default()
            .extend_from_slice(values);
    }
}

#[cfg(test)]
impl UnfoldSource for MemSpools {
    fn unfold(&mut self, upload: u64, len: usize, feed: &mut dyn FnMut(Input)) -> bool {
        let spool = self.values.remove(&upload).unwrap_or_default();
        assert!(
            len <= spool.len(),
            "asked for {len} values, {} sent",
            spool.len()
        );
        self.unfolded += 1;
        if self.broken {
            return false;
        }
        for (i, piece) in spool[..len].chunks(7).enumerate() {
            feed(Input::Unfold {
                upload,
                offset: i * 7,
                values: piece.to_vec(),
            });
        }
        true
    }
}
