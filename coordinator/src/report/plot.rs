//! The report's plots, drawn by `plotters` into SVG strings (its SVG backend only).
//!
//! Nothing from a config, certificate or peer is passed to `plotters`: the only text it
//! draws is the axis descriptions below (fixed) and tick labels (numbers). Series are told
//! apart by colour; their names go in an HTML legend beside the plot, escaped there.
//! (`plotters-svg` escapes text and attribute values itself as well.)
//!
//! Markers are `<circle>` elements, one per data point and nothing else draws circles, so
//! a reader (the tests) can count a plot's points.

use plotters::prelude::*;

/// Series colours, in order (hex for the HTML legend, the same as `COLOURS`).
pub(super) const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (57, 59, 121),
];

/// The budget line's colour.
pub(super) const LIMIT: (u8, u8, u8) = (214, 39, 40);

pub(super) fn colour(i: usize) -> (u8, u8, u8) {
    PALETTE[i % PALETTE.len()]
}

pub(super) fn hex((r, g, b): (u8, u8, u8)) -> String {
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// One series: points (x = round), drawn as a line with a marker at each point, and an
/// optional band (x, low, high) shaded behind it.
#[derive(Debug, Clone)]
pub(super) struct Series {
    pub colour: (u8, u8, u8),
    pub points: Vec<(f64, f64)>,
    pub band: Option<Vec<(f64, f64, f64)>>,
    /// Line width and marker radius in pixels: series drawn first are wider, so lines that
    /// coincide (sites charged alike) still show each colour.
    pub width: u32,
}

impl Series {
    /// Series `i` of `n` in the palette's colour `i`, wider the earlier it is drawn.
    pub fn nth(i: usize, n: usize, points: Vec<(f64, f64)>) -> Self {
        Self {
            colour: colour(i),
            points,
            band: None,
            width: 2 + 2 * u32::try_from(n.saturating_sub(i + 1).min(6)).unwrap_or(6),
        }
    }
}

/// A plot of several series against the round.
#[derive(Debug, Clone)]
pub(super) struct Plot {
    pub y_desc: &'static str,
    pub series: Vec<Series>,
    /// A horizontal limit (the budget), drawn across the plot.
    pub limit: Option<f64>,
    /// Start the y axis at 0 (counts, epsilons) rather than at the data's least value.
    pub from_zero: bool,
    /// The values are counts: label whole numbers only.
    pub counts: bool,
}

impl Plot {
    /// Markers the SVG holds: one per point.
    pub fn markers(&self) -> usize {
        self.series.iter().map(|s| s.points.len()).sum()
    }
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 360;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Draws `plot` as an SVG document (an `<svg>` element).
pub(super) fn svg(plot: &Plot) -> Result<String, String> {
    let xs = || {
        plot.series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
    };
    let ys = || {
        plot.series.iter().flat_map(|s| {
            s.points
                .iter()
                .map(|p| p.1)
                .chain(s.band.iter().flatten().flat_map(|&(_, lo, hi)| [lo, hi]))
        })
    };
    let finite = |v: &f64| v.is_finite();
    let x_min = xs().filter(finite).fold(f64::INFINITY, f64::min);
    let x_max = xs().filter(finite).fold(f64::NEG_INFINITY, f64::max);
    let (x_min, x_max) = if x_min.is_finite() {
        (x_min - 0.5, x_max + 0.5)
    } else {
        (-0.5, 0.5)
    };
    let mut y_max = ys().filter(finite).fold(f64::NEG_INFINITY, f64::max);
    let mut y_min = ys().filter(finite).fold(f64::INFINITY, f64::min);
    if let Some(l) = plot.limit.filter(|l| l.is_finite()) {
        y_max = y_max.max(l);
        y_min = y_min.min(l);
    }
    if plot.from_zero {
        y_min = y_min.min(0.0);
    }
    if !y_max.is_finite() || !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.08).max(1e-9);
    let y_max = y_max + pad;
    let y_min = if plot.from_zero && y_min >= 0.0 {
        0.0
    } else {
        y_min - pad
    };

    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x_min..x_max, y_min..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(plot.y_desc)
            .x_labels(12)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| match plot.counts {
                true if (y - y.round()).abs() < 1e-9 => format!("{y:.0}"),
                true => String::new(),
                false => format!("{y:.3}"),
            })
            .light_line_style(RGBColor(236, 236, 236))
            .draw()
            .map_err(err)?;
        for s in &plot.series {
            let (r, g, b) = s.colour;
            let c = RGBColor(r, g, b);
            if let Some(band) = &s.band {
                let upper = band.iter().map(|&(x, _, hi)| (x, hi));
                let lower = band.iter().rev().map(|&(x, lo, _)| (x, lo));
                let outline: Vec<(f64, f64)> = upper.chain(lower).collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(outline, c.mix(0.18).filled())))
                    .map_err(err)?;
            }
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    c.stroke_width(s.width),
                ))
                .map_err(err)?;
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|&p| Circle::new(p, s.width + 1, c.filled())),
                )
                .map_err(err)?;
        }
        if let Some(l) = plot.limit {
            let (r, g, b) = LIMIT;
            chart
                .draw_series(LineSeries::new(
                    [(x_min, l), (x_max, l)],
                    RGBColor(r, g, b).stroke_width(2),
                ))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn one_circle_per_point_and_a_band_when_asked() {
        let plot = Plot {
            y_desc: "accuracy",
            series: vec![Series {
                colour: colour(0),
                points: vec![(0.0, 0.5), (1.0, 0.7), (2.0, 0.8)],
                band: Some(vec![(0.0, 0.4, 0.6), (1.0, 0.6, 0.8), (2.0, 0.7, 0.9)]),
                width: 2,
            }],
            limit: None,
            from_zero: false,
            counts: false,
        };
        let s = svg(&plot).unwrap();
        assert!(s.starts_with("<svg"), "{}", &s[..80.min(s.len())]);
        assert_eq!(s.matches("<circle").count(), 3);
        assert_eq!(plot.markers(), 3);
        assert_eq!(s.matches("<polygon").count(), 1);
        assert!(s.contains("<polyline"));
    }

    #[test]
    fn one_point_or_none_still_draws() {
        let mut plot = Plot {
            y_desc: "epsilon",
            series: vec![Series::nth(1, 2, vec![(3.0, 0.0)])],
            limit: Some(1.0),
            from_zero: true,
            counts: true,
        };
        assert_eq!(svg(&plot).unwrap().matches("<circle").count(), 1);
        plot.series.clear();
        assert_eq!(svg(&plot).unwrap().matches("<circle").count(), 0);
    }
}
