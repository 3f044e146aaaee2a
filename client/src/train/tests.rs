#![allow(clippy::unwrap_used)]
use super::*;
use crate::data::{
    load_csv, load_ranges, scale_features, train_test_split, ColumnSelection, LoadOptions,
};
use fedpriv_common::arch::{Activation, Layer};
use fedpriv_common::model::l2_norm;

use candle_core::Var;

/// Labels as tensors: `[n]` values, and `[n, k]` one-hot rows for a softmax head.
struct Targets {
    y: Tensor,
    onehot: Option<Tensor>,
}

impl Targets {
    fn new(y: &[f32], head: Head, dev: &Device) -> candle_core::Result<Self> {
        let onehot = match head {
            Head::Softmax(k) => {
                let mut m = vec![0f32; y.len() * k];
                for (i, &c) in y.iter().enumerate() {
                    m[i * k + c as usize] = 1.0;
                }
                Some(Tensor::from_vec(m, (y.len(), k), dev)?)
            }
            _ => None,
        };
        Ok(Self {
            y: Tensor::from_slice(y, y.len(), dev)?,
            onehot,
        })
    }
}

/// Per-example losses `[n]` from differentiable ops, for the autograd reference.
fn per_example_loss(z: &Tensor, t: &Targets, head: Head) -> candle_core::Result<Tensor> {
    match (head, &t.onehot) {
        (Head::Softmax(_), Some(onehot)) => z.log_sum_exp(1)?.sub(&z.mul(onehot)?.sum(1)?),
        (Head::Sigmoid, _) => {
            // max(z, 0) - y z + ln(1 + e^-|z|): stable for any z. At z = 0 candle's
            // derivatives of relu and abs are both 1, which still sums to sigmoid(0) - y.
            let z = z.squeeze(1)?;
            let soft = z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
            z.relu()?.sub(&t.y.mul(&z)?)?.add(&soft)
        }
        (Head::Identity, _) => z.squeeze(1)?.sub(&t.y)?.sqr()?.affine(0.5, 0.0),
        (Head::Softmax(_), None) => Err(candle_core::Error::Msg("missing one-hot labels".into())),
    }
}

fn learner(arch: &Architecture, input: &[usize], task: Task, outputs: usize) -> Learner {
    Learner::new(arch, input, task, outputs).unwrap()
}

fn logistic(d: usize) -> Learner {
    learner(&Architecture::LogisticRegression, &[d], Task::Binary, 1)
}

/// Every layer kind, in small models, with the tasks they serve.
fn cases() -> Vec<(&'static str, Learner)> {
    let conv2d = |rest: Vec<Layer>| {
        let mut l = vec![Layer::Conv2d {
            channels: 4,
            kernel: 3,
            stride: 1,
            padding: 1,
        }];
        l.extend(rest);
        Architecture::Layers(l)
    };
    let embedded = table_spec(
        3,
        &[(4, Some(3)), (2, None), (5, Some(2))],
        Task::Multiclass,
        3,
    );
    vec![
        (
            "mlp over numeric, embedded and one-hot columns",
            Learner::for_data(
                &Architecture::Mlp {
                    hidden: vec![5],
                    activation: Activation::Tanh,
                },
                &embedded,
            )
            .unwrap(),
        ),
        ("logistic", logistic(4)),
        (
            "logistic, 3 classes",
            learner(&Architecture::LogisticRegression, &[4], Task::Multiclass, 3),
        ),
        (
            "linear",
            learner(&Architecture::LinearRegression, &[4], Task::Regression, 1),
        ),
        (
            "mlp tanh",
            learner(&Architecture::mlp(5), &[4], Task::Binary, 1),
        ),
        (
            "mlp relu 2 layers, 3 classes",
            learner(
                &Architecture::Mlp {
                    hidden: vec![6, 5],
                    activation: Activation::Relu,
                },
                &[4],
                Task::Multiclass,
                3,
            ),
        ),
        (
            "mlp gelu regression",
            learner(
                &Architecture::Mlp {
                    hidden: vec![5],
                    activation: Activation::Gelu,
                },
                &[4],
                Task::Regression,
                1,
            ),
        ),
        (
            "dense, layer norm, sigmoid",
            learner(
                &Architecture::Layers(vec![
                    Layer::Dense { units: 6 },
                    Layer::LayerNorm,
                    Layer::Activation(Activation::Sigmoid),
                    Layer::Dense { units: 1 },
                ]),
                &[4],
                Task::Binary,
                1,
            ),
        ),
        (
            "conv1d on a flat input, stride 2, padding, avg pool",
            learner(
                &Architecture::Layers(vec![
                    Layer::Conv1d {
                        channels: 3,
                        kernel: 3,
                        stride: 2,
                        padding: 1,
                    },
                    Layer::Activation(Activation::Tanh),
                    Layer::AvgPool { kernel: 2 },
                    Layer::Flatten,
                    Layer::Dense { units: 2 },
                ]),
                &[8],
                Task::Multiclass,
                2,
            ),
        ),
        (
            "conv2d, group norm, relu, max pool",
            learner(
                &conv2d(vec![
                    Layer::GroupNorm { groups: 2 },
                    Layer::Activation(Activation::Relu),
                    Layer::MaxPool { kernel: 2 },
                    Layer::Flatten,
                    Layer::Dense { units: 3 },
                ]),
                &[2, 4, 4],
                Task::Multiclass,
                3,
            ),
        ),
        (
            // Above backprop's SMALL_PRODUCT: the per-example products go through candle.
            "conv2d with 8 x 36 x 256 multiply-adds per example, conv2d, avg pool",
            learner(
                &Architecture::Layers(vec![
                    Layer::Conv2d {
                        channels: 8,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                    },
                    Layer::Activation(Activation::Gelu),
                    Layer::Conv2d {
                        channels: 2,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                    },
                    Layer::AvgPool { kernel: 4 },
                    Layer::Flatten,
                    Layer::Dense { units: 2 },
                ]),
                &[4, 16, 16],
                Task::Multiclass,
                2,
            ),
        ),
        (
            "conv1d, group norm on [c, l], relu, 1-d max pool, conv1d padded, layer norm on [c, l]",
            learner(
                &Architecture::Layers(vec![
                    Layer::Conv1d {
                        channels: 3,
                        kernel: 3,
                        stride: 1,
                        padding: 1,
                    },
                    Layer::GroupNorm { groups: 3 },
                    Layer::Activation(Activation::Relu),
                    Layer::MaxPool { kernel: 2 },
                    Layer::Conv1d {
                        channels: 2,
                        kernel: 2,
                        stride: 1,
                        padding: 1,
                    },
                    Layer::LayerNorm,
                    Layer::Flatten,
                    Layer::Dense { units: 2 },
                ]),
                &[8],
                Task::Multiclass,
                2,
            ),
        ),
        (
            "non-square conv2d, stride 2 and padding 1, layer norm on [c, h, w], tanh",
            learner(
                &Architecture::Layers(vec![
                    Layer::Conv2d {
                        channels: 3,
                        kernel: 3,
                        stride: 2,
                        padding: 1,
                    },
                    Layer::LayerNorm,
                    Layer::Activation(Activation::Tanh),
                    Layer::Flatten,
                    Layer::Dense { units: 2 },
                ]),
                &[2, 6, 4],
                Task::Multiclass,
                2,
            ),
        ),
        (
            "parameterless layers first: max pool, flatten, dense, gelu, dense",
            learner(
                &Architecture::Layers(vec![
                    Layer::MaxPool { kernel: 2 },
                    Layer::Flatten,
                    Layer::Dense { units: 4 },
                    Layer::Activation(Activation::Gelu),
                    Layer::Dense { units: 3 },
                ]),
                &[2, 4, 4],
                Task::Multiclass,
                3,
            ),
        ),
        (
            "mlp over one-hot columns only",
            Learner::for_data(
                &Architecture::mlp(4),
                &table_spec(2, &[(3, None), (2, None)], Task::Binary, 2),
            )
            .unwrap(),
        ),
        (
            "conv2d stride 2 without padding, dropout at rate 0",
            learner(
                &Architecture::Layers(vec![
                    Layer::Conv2d {
                        channels: 2,
                        kernel: 2,
                        stride: 2,
                        padding: 0,
                    },
                    Layer::Dropout { rate: 0.0 },
                    Layer::Flatten,
                    Layer::Dense { units: 1 },
                ]),
                &[1, 4, 4],
                Task::Binary,
                1,
            ),
        ),
    ]
}

/// A table of `numeric` features and categorical columns `(slots - 1 categories, embedding)`.
fn table_spec(
    numeric: usize,
    cats: &[(usize, Option<usize>)],
    task: Task,
    classes: usize,
) -> fedpriv_common::config::DataSpec {
    fedpriv_common::config::DataSpec {
        task,
        label: "y".into(),
        classes,
        class_labels: Vec::new(),
        features: (0..numeric).map(|i| format!("f{i}")).collect(),
        ranges: vec![[-1.0, 1.0]; numeric],
        label_range: None,
        fills: vec![None; numeric],
        categorical: cats
            .iter()
            .enumerate()
            .map(
                |(j, &(k, embedding))| fedpriv_common::config::CategoricalColumn {
                    name: format!("c{j}"),
                    categories: (0..k).map(|c| format!("v{c}")).collect(),
                    embedding,
                },
            )
            .collect(),
        image: None,
    }
}

/// A model with every value random (zero-initialised models would make the gradient test
/// too easy).
fn random_model(l: &Learner, seed: u64) -> FlatModel {
    let mut m = l.init(seed).unwrap();
    let mut rng = SplitMix64::new(seed ^ 0xABCD);
    for v in &mut m.values {
        *v = (rng.next_f64() * 2.0 - 1.0) as f32;
    }
    m
}

/// A batch of `n` examples with labels fit for the learner's head.
fn random_batch(l: &Learner, n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let d = l.input_len();
    let cats = match l.compiled.steps.first().map(|s| &s.layer) {
        Some(fedpriv_common::arch::Layer::Encode(enc)) => enc.categorical.clone(),
        _ => Vec::new(),
    };
    let x = (0..n * d)
        .map(|k| {
            let col = k % d;
            match cats.get(col.wrapping_sub(d - cats.len())) {
                Some((slots, _)) if col >= d - cats.len() => rng.below(*slots + 1) as f32,
                _ => (rng.next_f64() * 4.0 - 2.0) as f32,
            }
        })
        .collect();
    let y = (0..n)
        .map(|_| match l.head() {
            Head::Identity => (rng.next_f64() * 6.0 - 3.0) as f32,
            Head::Sigmoid => rng.below(2) as f32,
            Head::Softmax(k) => rng.below(k) as f32,
        })
        .collect();
    (x, y)
}

/// Reference: the gradient of one example's loss by a full autograd backward pass through
/// the parameters.
fn autograd_grad(l: &Learner, model: &FlatModel, x: &[f32], y: f32) -> Vec<f32> {
    let dev = Device::Cpu;
    let vars: Vec<Var> = param_tensors(model, &dev)
        .unwrap()
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let p: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let xt = Tensor::from_slice(x, (1, x.len()), &dev).unwrap();
    let t = Targets::new(&[y], l.head(), &dev).unwrap();
    let z = net::forward(&l.compiled, &p, &xt).unwrap();
    let loss = per_example_loss(&z, &t, l.head())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    vars.iter()
        .flat_map(|v| {
            grads
                .get(v.as_tensor())
                .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .unwrap_or_else(|| vec![0.0; v.as_tensor().elem_count()])
        })
        .collect()
}

/// Relative closeness on the vector's scale.
fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}: value {i}: {g} vs {w} (scale {scale})"
        );
    }
}

#[test]
fn per_example_gradients_equal_one_example_backward_pass_for_every_layer_kind() {
    let n = 7;
    for (case, (what, l)) in cases().into_iter().enumerate() {
        let d = l.input_len();
        let model = random_model(&l, case as u64);
        let (x, y) = random_batch(&l, n, 100 + case as u64);
        let reference: Vec<Vec<f32>> = (0..n)
            .map(|i| autograd_grad(&l, &model, &x[i * d..(i + 1) * d], y[i]))
            .collect();
        // One example at a time, no clipping: exactly that example's gradient.
        for i in 0..n {
            let (g, stats) =
                per_example_clipped_grad_sum(&l, &model, &x[i * d..(i + 1) * d], &y[i..=i], 1, 1e9)
                    .unwrap();
            assert_close(&g, &reference[i], 1e-5, &format!("{what}, example {i}"));
            let want = l2_norm(&reference[i]);
            assert!(
                (stats.mean_norm - want).abs() <= 1e-5 * want.max(1e-3),
                "{what}: norm {} vs {want}",
                stats.mean_norm
            );
        }
        // The whole batch at once, still unclipped: the sum of the references.
        let (g, _) = per_example_clipped_grad_sum(&l, &model, &x, &y, n, 1e9).unwrap();
        let sum: Vec<f32> = (0..g.len())
            .map(|j| reference.iter().map(|r| r[j]).sum())
            .collect();
        assert_close(&g, &sum, 1e-5, &format!("{what}, batch"));
        // A non-private step moves the model by the mean of the references.
        let names = (0..d).map(|i| format!("f{i}")).collect();
        let data = Dataset::new(x.clone(), y.clone(), names, "y".into()).unwrap();
        let mut stepped = model.clone();
        let lr = 0.5f32;
        sgd_step(&l, &mut stepped, &data, &(0..n).collect::<Vec<_>>(), lr).unwrap();
        let moved: Vec<f32> = model
            .values
            .iter()
            .zip(&stepped.values)
            .map(|(a, b)| (a - b) / lr)
            .collect();
        let mean: Vec<f32> = sum.iter().map(|v| v / n as f32).collect();
        assert_close(&moved, &mean, 1e-4, &format!("{what}, plain step"));
        // Clipped at the median norm: each example's share is its reference scaled down.
        let mut norms: Vec<f64> = reference.iter().map(|r| l2_norm(r)).collect();
        norms.sort_by(f64::total_cmp);
        let clip = norms[n / 2];
        let (g, stats) = per_example_clipped_grad_sum(&l, &model, &x, &y, n, clip).unwrap();
        let want: Vec<f32> = (0..g.len())
            .map(|j| {
                reference
                    .iter()
                    .map(|r| {
                        let norm = l2_norm(r) * (1.0 + CLIP_MARGIN);
                        let s = if norm > clip { clip / norm } else { 1.0 };
                        r[j] * s as f32
                    })
                    .sum()
            })
            .collect();
        assert_close(&g, &want, 1e-5, &format!("{what}, clipped"));
        assert!(stats.clipped_fraction > 0.0 && stats.clipped_fraction < 1.0);
    }
}

/// One example's loss under `model`, by the forward pass alone.
fn loss_of(l: &Learner, model: &FlatModel, x: &[f32], y: f32) -> f64 {
    let dev = Device::Cpu;
    let p = param_tensors(model, &dev).unwrap();
    let xt = Tensor::from_slice(x, (1, x.len()), &dev).unwrap();
    let z = net::forward(&l.compiled, &p, &xt).unwrap();
    example_loss(
        &z.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y,
        l.head(),
    )
    .0
}

/// Central differences of `loss` at `values`, one value at a time.
fn finite_differences(values: &[f32], h: f32, loss: impl Fn(&[f32]) -> f64) -> Vec<f32> {
    (0..values.len())
        .map(|j| {
            let mut up = values.to_vec();
            up[j] += h;
            let mut down = values.to_vec();
            down[j] -= h;
            ((loss(&up) - loss(&down)) / (2.0 * f64::from(h))) as f32
        })
        .collect()
}

#[test]
fn dropouts_backward_matches_finite_differences_with_its_masks_fixed() {
    // No autograd reference has dropout in training; the training loss with the masks the
    // seed fixes is a function of the model, and its gradient is what the pass returns.
    let l = learner(
        &Architecture::Layers(vec![
            Layer::Dense { units: 6 },
            Layer::Activation(Activation::Tanh),
            Layer::Dropout { rate: 0.5 },
            Layer::Dense { units: 1 },
        ]),
        &[3],
        Task::Regression,
        1,
    );
    let model = random_model(&l, 3);
    let (x, y) = random_batch(&l, 4, 9);
    let run = |values: &[f32]| {
        l.gradient_sum(values, &x, &y, backprop::Summing::Plain, 77)
            .unwrap()
    };
    let grad = run(&model.values).sum;
    let numeric = finite_differences(&model.values, 1e-2, |v| run(v).loss);
    assert_close(
        &grad,
        &numeric,
        2e-2,
        "dropout, backward pass vs finite differences",
    );
}

#[test]
fn an_example_whose_scaled_gradient_is_subnormal_stays_within_the_clip_norm() {
    // A crafted model (found in review): an activation of 3e38 into the last layer, so that
    // the clipped output gradient lands among f32's subnormals, where rounding can add up to
    // half of its value. Clip norms sweep the rounding's range.
    let l = learner(
        &Architecture::Layers(vec![Layer::Dense { units: 1 }, Layer::Dense { units: 1 }]),
        &[1],
        Task::Regression,
        1,
    );
    let model = FlatModel::new(l.spec().clone(), vec![3e38, 0.0, 1e-38, 0.0]).unwrap();
    let (_, unclipped) = per_example_clipped_grad_sum(&l, &model, &[1.0], &[0.0], 1, 1e30).unwrap();
    let norm = unclipped.mean_norm;
    let (mut kept, mut zeroed) = (0, 0);
    for t in 0..200 {
        // The clipped output gradient at 1 + t/100 times the smallest subnormal.
        let clip =
            (1.0 + f64::from(t) / 100.0) * 1.401_298_5e-45 * norm * (1.0 + CLIP_MARGIN) / 3.0;
        let (g, _) = per_example_clipped_grad_sum(&l, &model, &[1.0], &[0.0], 1, clip).unwrap();
        let contribution = l2_norm(&g);
        assert!(
            contribution <= clip,
            "clip {clip:e} exceeded: {contribution:e}"
        );
        if contribution > 0.0 {
            kept += 1;
        } else {
            zeroed += 1;
        }
    }
    // Rounding down keeps an example, rounding up past the clip norm drops it.
    assert!(kept > 0 && zeroed > 0, "kept {kept}, zeroed {zeroed}");
}

#[test]
fn max_pooling_gradients_match_finite_differences() {
    // Outside truth for the autograd reference the per-example gradients are checked
    // against: candle 0.9's own max-pool backward scaled the gradient below the pool by the
    // share of the window holding the maximum (1/4 here), and the reference shared it.
    let l = learner(
        &Architecture::Layers(vec![
            Layer::Conv2d {
                channels: 3,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            Layer::MaxPool { kernel: 2 },
            Layer::Flatten,
            Layer::Dense { units: 3 },
        ]),
        &[2, 4, 4],
        Task::Multiclass,
        3,
    );
    let pool_1d = learner(
        &Architecture::Layers(vec![
            Layer::Conv1d {
                channels: 2,
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            Layer::MaxPool { kernel: 3 },
            Layer::Flatten,
            Layer::Dense { units: 2 },
        ]),
        &[2, 9],
        Task::Multiclass,
        2,
    );
    for (what, l) in [("2-d", l), ("1-d", pool_1d)] {
        let model = random_model(&l, 5);
        let (x, y) = random_batch(&l, 1, 6);
        let grad = autograd_grad(&l, &model, &x, y[0]);
        let numeric = finite_differences(&model.values, 1e-3, |v| {
            let m = FlatModel::new(model.spec.clone(), v.to_vec()).unwrap();
            loss_of(&l, &m, &x, y[0])
        });
        assert_close(&grad, &numeric, 1e-2, &format!("{what} max pool, autograd"));
        let (per_example, _) = per_example_clipped_grad_sum(&l, &model, &x, &y, 1, 1e9).unwrap();
        assert_close(
            &per_example,
            &numeric,
            1e-2,
            &format!("{what} max pool, DP-SGD"),
        );
    }
}

#[test]
fn a_batch_split_over_threads_gives_the_whole_batchs_sum_masks_and_norms() {
    // 3 x 64 rows: split in three where rayon has three threads; with dropout, whose masks
    // must follow the row's place in the batch, and padding rows from 150 on.
    let l = learner(
        &Architecture::Layers(vec![
            Layer::Dense { units: 16 },
            Layer::Activation(Activation::Relu),
            Layer::Dropout { rate: 0.3 },
            Layer::Dense { units: 3 },
        ]),
        &[5],
        Task::Multiclass,
        3,
    );
    let model = random_model(&l, 11);
    let n = 192;
    let (x, y) = random_batch(&l, n, 12);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| clipped_sum(&l, &model, &x, &y, n, 150, 0.5, 99).unwrap())
    };
    let (one, one_stats) = run(1);
    let (three, three_stats) = run(3);
    assert_close(&three, &one, 1e-5, "split over three threads");
    assert_eq!(one_stats.batch_n, three_stats.batch_n);
    assert_eq!(one_stats.clipped_fraction, three_stats.clipped_fraction);
    assert!((one_stats.mean_norm - three_stats.mean_norm).abs() <= 1e-6 * one_stats.mean_norm);
    // The masks differ from row to row: a second seed gives another sum.
    let other = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap()
        .install(|| clipped_sum(&l, &model, &x, &y, n, 150, 0.5, 100).unwrap().0);
    assert!(other.iter().zip(&three).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn clipping_bounds_each_examples_contribution() {
    for (case, (what, l)) in cases().into_iter().enumerate() {
        let d = l.input_len();
        let model = random_model(&l, 7 + case as u64);
        let (mut x, y) = random_batch(&l, 12, 300 + case as u64);
        // Some far-out examples, so that norms span orders of magnitude.
        for v in x.iter_mut().step_by(5) {
            *v *= 1000.0;
        }
        for clip in [1e-3, 0.1, 1.0, 5.0] {
            for i in 0..12 {
                let (g, _) = per_example_clipped_grad_sum(
                    &l,
                    &model,
                    &x[i * d..(i + 1) * d],
                    &y[i..=i],
                    1,
                    clip,
                )
                .unwrap();
                let norm = l2_norm(&g);
                assert!(norm <= clip * (1.0 + 1e-6), "{what} clip {clip}: {norm}");
            }
            let (g, _) = per_example_clipped_grad_sum(&l, &model, &x, &y, 12, clip).unwrap();
            assert!(l2_norm(&g) <= 12.0 * clip * (1.0 + 1e-6), "{what}");
        }
    }
}

#[test]
fn empty_batch_gives_zero_sum() {
    let l = learner(&Architecture::mlp(3), &[3], Task::Binary, 1);
    let model = random_model(&l, 1);
    let (g, stats) = per_example_clipped_grad_sum(&l, &model, &[], &[], 0, 1.0).unwrap();
    assert_eq!(g, vec![0.0; model.values.len()]);
    assert_eq!(stats, PerExampleStats::default());
}

fn toy_dataset(l: &Learner, n: usize) -> Dataset {
    let (x, y) = random_batch(l, n, 42);
    let d = l.input_len();
    Dataset::new(x, y, (0..d).map(|i| format!("f{i}")).collect(), "y".into()).unwrap()
}

#[test]
fn dp_sgd_step_applies_the_formula() {
    let l = learner(&Architecture::mlp(5), &[3], Task::Binary, 1);
    let data = toy_dataset(&l, 10);
    let model = random_model(&l, 5);
    let noise: Vec<f64> = (0..model.values.len())
        .map(|i| (i as f64 - 10.0) * 0.01)
        .collect();
    let batch = [1usize, 4, 4, 9];
    let (xb, yb) = gather(&data, &batch).unwrap();
    let (sum, _) = per_example_clipped_grad_sum(&l, &model, &xb, &yb, 4, 0.5).unwrap();
    let start: Vec<f64> = model.values.iter().map(|&v| f64::from(v)).collect();
    let mut theta = start.clone();
    let stats = dp_sgd_step(&l, &mut theta, &data, &batch, 0.5, &noise, 5.0, 0.1, 0).unwrap();
    assert_eq!(stats.batch_n, 4);
    for j in 0..model.values.len() {
        let want = start[j] - 0.1f64 * (f64::from(sum[j]) + noise[j]) / 5.0;
        // The padding rows change nothing but the matmul's summation order.
        assert!((theta[j] - want).abs() < 1e-6, "{} vs {want}", theta[j]);
    }
    // An empty Poisson batch: no gradient, but the noise is still added, in f64.
    let mut theta = start.clone();
    let stats = dp_sgd_step(&l, &mut theta, &data, &[], 0.5, &noise, 5.0, 0.1, 0).unwrap();
    assert_eq!(stats.batch_n, 0);
    for ((&before, &after), &e) in start.iter().zip(&theta).zip(&noise) {
        assert_eq!(after, before - f64::from(0.1f32) / 5.0 * e);
    }
    // Errors leave the model as it was.
    let mut m = start.clone();
    let step = |m: &mut Vec<f64>, batch: &[usize], noise: &[f64], b: f64, clip: f64| {
        dp_sgd_step(&l, m, &data, batch, clip, noise, b, 0.1, 0)
    };
    assert!(matches!(
        step(&mut m, &batch, &noise[1..], 5.0, 0.5),
        Err(TrainError::NoiseLength { .. })
    ));
    assert!(matches!(
        step(&mut m, &[10], &noise, 5.0, 0.5),
        Err(TrainError::IndexOutOfRange { index: 10, n: 10 })
    ));
    assert!(matches!(
        step(&mut m, &batch, &noise, 0.0, 0.5),
        Err(TrainError::Config(_))
    ));
    assert!(matches!(
        step(&mut m, &batch, &noise, 5.0, -1.0),
        Err(TrainError::Config(_))
    ));
    assert_eq!(m, start);
}

#[test]
fn an_example_the_model_overflows_for_counts_as_zero_and_never_fails_the_step() {
    // A crafted linear model whose output overflows f32 for records with both features
    // above 0.6 only: those examples' gradients are infinite.
    let l = learner(&Architecture::LinearRegression, &[2], Task::Regression, 1);
    let model =
        FlatModel::new(l.spec().clone(), vec![f32::MAX / 1.5, f32::MAX / 1.5, 0.0]).unwrap();
    let x = [0.9f32, 0.9, 0.1, 0.2, 0.95, 0.7, -0.3, 0.5];
    let y = [0.0f32, 1.0, 0.5, -1.0];
    let (sum, stats) = per_example_clipped_grad_sum(&l, &model, &x, &y, 4, 1.0).unwrap();
    assert!(sum.iter().all(|v| v.is_finite()));
    // The same as a batch of only the two finite examples.
    let (finite, _) =
        per_example_clipped_grad_sum(&l, &model, &[0.1, 0.2, -0.3, 0.5], &[0.5, -1.0], 2, 1.0)
            .unwrap();
    assert_eq!(sum, finite);
    assert_eq!(stats.batch_n, 4);
}

#[test]
fn padding_rows_change_nothing_but_the_time() {
    for (what, l) in cases() {
        let model = random_model(&l, 9);
        let (x, y) = random_batch(&l, 5, 3);
        let (plain, _) = per_example_clipped_grad_sum(&l, &model, &x, &y, 5, 0.7).unwrap();
        let (mut xp, mut yp) = (x.clone(), y.clone());
        let (junk_x, junk_y) = random_batch(&l, 20, 4);
        xp.extend(junk_x);
        yp.extend(junk_y);
        let (padded, stats) = clipped_sum(&l, &model, &xp, &yp, 25, 5, 0.7, 0).unwrap();
        assert_close(&padded, &plain, 1e-6, what);
        assert_eq!(stats.batch_n, 5);
    }
    assert!(padded_batch(48.0) >= 48 + 6 * 7);
}

#[test]
fn dropout_is_the_identity_in_use_and_drops_values_in_training() {
    let l = learner(
        &Architecture::Layers(vec![
            Layer::Dropout { rate: 0.5 },
            Layer::Dense { units: 1 },
        ]),
        &[400],
        Task::Regression,
        1,
    );
    let mut model = l.init(0).unwrap();
    model.values.iter_mut().for_each(|v| *v = 1.0);
    let data = Dataset::new(
        vec![1.0; 400],
        vec![0.0],
        (0..400).map(|i| format!("f{i}")).collect(),
        "y".into(),
    )
    .unwrap();
    // In use: 400 inputs of 1 times weights of 1, plus a bias of 1.
    assert_eq!(outputs(&l, &model, &data).unwrap(), vec![401.0]);
    // In training (per-example gradients): about half the inputs are dropped and the rest
    // doubled, so the weight gradient is 0 or 2 times the residual, roughly half of each.
    let (g, _) = clipped_sum(&l, &model, &data.x, &data.y, 1, 1, 1e12, 7).unwrap();
    let zeros = g[..400].iter().filter(|&&v| v == 0.0).count();
    assert!((120..280).contains(&zeros), "{zeros} of 400 dropped");
}

#[test]
fn shape_mismatches_are_errors() {
    let l = logistic(3);
    let model = l.init(0).unwrap();
    let data = toy_dataset(&logistic(2), 5);
    let cfg = LocalTraining {
        epochs: 1,
        batch_size: 2,
        learning_rate: 0.1,
    };
    assert!(matches!(
        train_local(&l, &model, &data, &cfg, 0),
        Err(TrainError::FeatureMismatch {
            expected: 3,
            got: 2
        })
    ));
    assert!(matches!(
        evaluate(&l, &model, &data),
        Err(TrainError::FeatureMismatch { .. })
    ));
    // A logistic model is not an MLP.
    let mlp = learner(&Architecture::mlp(4), &[3], Task::Binary, 1);
    assert!(matches!(
        evaluate(&mlp, &model, &toy_dataset(&l, 3)),
        Err(TrainError::Model(_))
    ));
    // Values that do not match the spec.
    let mut short = l.init(0).unwrap();
    short.values.pop();
    assert!(matches!(
        evaluate(&l, &short, &toy_dataset(&l, 3)),
        Err(TrainError::Model(_))
    ));
    // Batch slices that do not match batch_n.
    let two = logistic(2);
    let ok = two.init(0).unwrap();
    assert!(matches!(
        per_example_clipped_grad_sum(&two, &ok, &[1.0; 5], &[0.0; 3], 3, 1.0),
        Err(TrainError::BatchShape { .. })
    ));
    // Labels that do not fit the head.
    assert!(matches!(
        per_example_clipped_grad_sum(&two, &ok, &[1.0; 4], &[0.0, 2.0], 2, 1.0),
        Err(TrainError::InvalidLabel { index: 1, .. })
    ));
    let three = learner(&Architecture::LogisticRegression, &[2], Task::Multiclass, 3);
    let m3 = three.init(0).unwrap();
    assert!(matches!(
        per_example_clipped_grad_sum(&three, &m3, &[1.0; 2], &[3.0], 1, 1.0),
        Err(TrainError::InvalidLabel { index: 0, .. })
    ));
    // Models that do not fit the task.
    assert!(Learner::new(&Architecture::LinearRegression, &[2], Task::Binary, 1).is_err());
    assert!(Learner::new(&Architecture::LogisticRegression, &[2], Task::Regression, 1).is_err());
    assert!(Learner::new(&Architecture::LogisticRegression, &[0], Task::Binary, 1).is_err());
    assert!(Learner::new(&Architecture::mlp(0), &[2], Task::Binary, 1).is_err());
    let bad = LocalTraining {
        batch_size: 0,
        ..cfg
    };
    let d2 = toy_dataset(&two, 4);
    assert!(matches!(
        train_local(&two, &ok, &d2, &bad, 0),
        Err(TrainError::Config(_))
    ));
    let bad = LocalTraining {
        learning_rate: f32::NAN,
        ..cfg
    };
    assert!(matches!(
        train_local(&two, &ok, &d2, &bad, 0),
        Err(TrainError::Config(_))
    ));
}

#[test]
fn evaluate_matches_hand_computation() {
    let names = || vec!["a".to_string(), "b".to_string()];
    // Logistic: w = [1, -1], b = 0.5; logits 1.5 and -0.5, both labels 1.
    let l = logistic(2);
    let mut m = l.init(0).unwrap();
    m.values = vec![1.0, -1.0, 0.5];
    let data = Dataset::new(
        vec![1.0, 0.0, 0.0, 1.0],
        vec![1.0, 1.0],
        names(),
        "y".into(),
    )
    .unwrap();
    let got = evaluate(&l, &m, &data).unwrap();
    let want = ((1.0 + (-1.5f64).exp()).ln() + (1.0 + 0.5f64.exp()).ln()) / 2.0;
    assert!((got.loss - want).abs() < 1e-6, "{} vs {want}", got.loss);
    assert_eq!(got.accuracy, Some(0.5));
    assert_eq!(got.rmse, None);
    // Softmax over 3 classes: logits [1, 0, 0] for x = [1, 0]; label 0 right, 2 wrong.
    let l3 = learner(&Architecture::LogisticRegression, &[2], Task::Multiclass, 3);
    let mut m = l3.init(0).unwrap();
    m.values = vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let data = Dataset::new(
        vec![1.0, 0.0, 1.0, 0.0],
        vec![0.0, 2.0],
        names(),
        "y".into(),
    )
    .unwrap();
    let got = evaluate(&l3, &m, &data).unwrap();
    let lse = (1f64.exp() + 2.0).ln();
    assert!((got.loss - ((lse - 1.0) + lse) / 2.0).abs() < 1e-6);
    assert_eq!(got.accuracy, Some(0.5));
    // Linear regression: w = [2, 0], b = 1; predictions 3 and 5 for labels 3 and 4.
    let lr = learner(&Architecture::LinearRegression, &[2], Task::Regression, 1);
    let mut m = lr.init(0).unwrap();
    m.values = vec![2.0, 0.0, 1.0];
    let data = Dataset::new(
        vec![1.0, 7.0, 2.0, -7.0],
        vec![3.0, 4.0],
        names(),
        "y".into(),
    )
    .unwrap();
    let got = evaluate(&lr, &m, &data).unwrap();
    assert!((got.loss - 0.5).abs() < 1e-9);
    assert!((got.rmse.unwrap() - 0.5f64.sqrt()).abs() < 1e-9);
}

fn breast_cancer() -> (Dataset, Dataset) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
    let ranges = load_ranges(dir.join("breast_cancer_ranges.toml")).unwrap();
    let selection = ColumnSelection {
        features: ranges.features.keys().cloned().collect(),
        label: "malignant".into(),
    };
    let mut data = load_csv(
        dir.join("breast_cancer_wisconsin.csv"),
        &selection,
        &LoadOptions::binary(),
    )
    .unwrap();
    let r = ranges.for_features(&data.feature_names).unwrap();
    scale_features(&mut data, &r).unwrap();
    train_test_split(&data, 0.2, 1).unwrap()
}

fn majority(data: &Dataset) -> f64 {
    let pos = data.y.iter().filter(|&&v| v > 0.5).count() as f64 / data.n as f64;
    pos.max(1.0 - pos)
}

#[test]
fn non_private_training_learns_breast_cancer() {
    let (train, test) = breast_cancer();
    let cfg = LocalTraining {
        epochs: 20,
        batch_size: 32,
        learning_rate: 0.5,
    };
    for arch in [
        Architecture::LogisticRegression,
        Architecture::Mlp {
            hidden: vec![16, 8],
            activation: Activation::Relu,
        },
    ] {
        let l = learner(&arch, &[train.d], Task::Binary, 1);
        let model = l.init(3).unwrap();
        let trained = train_local(&l, &model, &train, &cfg, 1).unwrap();
        let acc = evaluate(&l, &trained, &test).unwrap().accuracy.unwrap();
        assert!(acc > 0.93 && acc > majority(&test), "{arch:?}: {acc}");
    }
}

#[test]
fn sgd_step_lowers_the_batch_loss() {
    let (train, _) = breast_cancer();
    let l = logistic(train.d);
    let mut model = l.init(0).unwrap();
    let batch: Vec<usize> = (0..64).collect();
    let first = sgd_step(&l, &mut model, &train, &batch, 0.5).unwrap();
    assert!(
        (first - std::f64::consts::LN_2).abs() < 1e-5,
        "zero model: loss ln 2, got {first}"
    );
    let second = sgd_step(&l, &mut model, &train, &batch, 0.5).unwrap();
    assert!(second < first);
}

#[test]
fn clipped_sgd_without_noise_learns_breast_cancer() {
    // DP-SGD's mechanics with the noise switched off (a zero slice): clipping alone must
    // not stop learning.
    let (train, test) = breast_cancer();
    let l = logistic(train.d);
    let mut model = l.init(0).unwrap();
    let zeros = vec![0f64; model.values.len()];
    let mut theta: Vec<f64> = model.values.iter().map(|&v| f64::from(v)).collect();
    let mut rng = SplitMix64::new(11);
    let expected = 32.0;
    for _ in 0..150 {
        let q = expected / train.n as f64;
        let batch: Vec<usize> = (0..train.n).filter(|_| rng.next_f64() < q).collect();
        dp_sgd_step(
            &l, &mut theta, &train, &batch, 1.0, &zeros, expected, 1.0, 0,
        )
        .unwrap();
    }
    model.values = saturated_f32(&theta);
    let acc = evaluate(&l, &model, &test).unwrap().accuracy.unwrap();
    assert!(acc > 0.93, "{acc}");
}
