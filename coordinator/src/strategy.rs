//! Server-side optimisers: how the mean of the sites' deltas moves the global model.
//!
//! Aggregation weights are uniform. Weighting by the sites' self-reported sample counts
//! would let one site's claim scale its influence, which breaks the sensitivity bound the
//! privacy accounting rests on.

use fedpriv_common::config::Strategy;

/// A server optimiser: applies a pseudo-gradient (the mean delta) to the global model.
pub trait ServerOptimizer: Send {
    fn apply(&mut self, global: &mut [f32], mean_delta: &[f32]);
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
    use super::*;

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
