//! Server-side optimisers: how the mean of the sites' deltas moves the global model.
//!
//! Aggregation weights are uniform. Weighting by the sites' self-reported sample counts
//! would let one site's claim scale its influence, which breaks the sensitivity bound the
//! privacy accounting rests on.

use fedpriv_common::config::Strategy;

/// A server optimiser: applies a pseudo-gradient (the mean delta) to the global model.
pub trait ServerOptimizer: Send {
    fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]);

    /// State that must survive a restart (FedAdam's moments), flat; `None` when there is
    /// none.
    fn state(&self) -> Option<Vec<f32>> {
        None
    }

    /// Puts back what [`Self::state`] gave.
    fn restore(&mut self, state: &[f32]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err("this optimiser keeps no state".into())
        }
    }
}

/// FedAvg: `global += lr * mean_delta`.
#[derive(Debug)]
pub struct FedAvg {
    pub lr: f32,
}

impl ServerOptimizer for FedAvg {
    fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]) {
        for (g, d) in global.iter_mut().zip(mean_delta) {
            *g += self.lr * d;
        }
    }
}

/// FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization").
#[derive(Debug)]
pub struct FedAdam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub tau: f32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl FedAdam {
    pub fn new(lr: f32, dim: usize) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            m: vec![0.0; dim],
            v: vec![0.0; dim],
        }
    }
}

impl ServerOptimizer for FedAdam {
    fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]) {
        for (((g, d), m), v) in global
            .iter_mut()
            .zip(mean_delta)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = self.beta1 * *m + (1.0 - self.beta1) * d;
            *v = self.beta2 * *v + (1.0 - self.beta2) * d * d;
            *g += self.lr * *m / (v.sqrt() + self.tau);
        }
    }

    /// The first moments, then the second.
    fn state(&self) -> Option<Vec<f32>> {
        Some(self.m.iter().chain(&self.v).copied().collect())
    }

    fn restore(&mut self, state: &[f32]) -> Result<(), String> {
        let dim = self.m.len();
        if state.len() != 2 * dim {
            return Err(format!(
                "FedAdam state has {} values, the model needs {}",
                state.len(),
                2 * dim
            ));
        }
        if state.iter().any(|x| !x.is_finite()) || state[dim..].iter().any(|&v| v < 0.0) {
            return Err("FedAdam state holds non-finite or negative second moments".into());
        }
        self.m.copy_from_slice(&state[..dim]);
        self.v.copy_from_slice(&state[dim..]);
        Ok(())
    }
}

/// The optimiser a study names.
pub fn for_study(strategy: Strategy, lr: f32, dim: usize) -> Box<dyn ServerOptimizer> {
    match strategy {
        Strategy::FedAvg => Box::new(FedAvg { lr }),
        Strategy::FedAdam => Box::new(FedAdam::new(lr, dim)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fedadam_resumed_from_its_state_moves_as_if_never_stopped() {
        let deltas = [[0.5f32, -1.0], [0.25, 0.75], [-0.5, 0.1]];
        let mut a = FedAdam::new(0.1, 2);
        let mut ga = vec![1.0f32, 2.0];
        a.apply(&mut ga, &deltas[0]);
        let saved = a.state().unwrap();
        let mut b = FedAdam::new(0.1, 2);
        b.restore(&saved).unwrap();
        let mut gb = ga.clone();
        // A fresh optimiser (the old restart) moves differently.
        let mut fresh = FedAdam::new(0.1, 2);
        let mut gf = ga.clone();
        for d in &deltas[1..] {
            a.apply(&mut ga, d);
            b.apply(&mut gb, d);
            fresh.apply(&mut gf, d);
        }
        assert_eq!(ga, gb);
        assert_ne!(ga, gf);
        assert!(b.restore(&saved[1..]).is_err());
        assert!(b.restore(&[0.0, 0.0, -1.0, 0.0]).is_err());
        assert!(FedAvg { lr: 1.0 }.state().is_none());
    }

    #[test]
    fn fedavg_moves_by_lr_times_delta() {
        let mut g = vec![1.0f32, 2.0];
        FedAvg { lr: 0.5 }.apply(&mut g, &[2.0, -2.0]);
        assert_eq!(g, vec![2.0, 1.0]);
    }

    #[test]
    fn fedadam_steps_in_the_direction_of_the_delta() {
        let mut opt = FedAdam::new(0.1, 2);
        let mut g = vec![0.0f32, 0.0];
        for _ in 0..5 {
            opt.apply(&mut g, &[1.0, -1.0]);
        }
        assert!(g[0] > 0.1 && g[1] < -0.1, "{g:?}");
        // Adam's steps are scale-free: a 100x larger delta moves about as far.
        let mut big = FedAdam::new(0.1, 1);
        let mut h = vec![0.0f32];
        for _ in 0..5 {
            big.apply(&mut h, &[100.0]);
        }
        assert!((h[0] - g[0]).abs() < 0.05, "{} vs {}", h[0], g[0]);
    }
}
