//! Special functions the accountants evaluate many thousands of times per question.
//!
//! What this does not do: anything outside f64, or any function the accountants do not
//! need.

// The coefficients are copied digit for digit from the C source they come from.
#![allow(clippy::excessive_precision)]

/// erfc, as `libm::erfc` computes it (FreeBSD's s_erf.c, by way of musl: the rational
/// approximations and the split of x^2 below are theirs; "Copyright (C) 1993 by Sun
/// Microsystems, Inc. All rights reserved. Developed at SunPro, a Sun Microsystems, Inc.
/// business. Permission to use, copy, modify, and distribute this software is freely
/// granted, provided that this notice is preserved."), but with the standard library's
/// `exp`: `libm`'s portable `exp` made the two calls per tail the accountant's largest
/// cost. Tested against `libm::erfc` to a few ulps.
pub(crate) fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < 0.84375 {
        const PP: [f64; 5] = [
            1.28379167095512558561e-01,
            -3.25042107247001499370e-01,
            -2.84817495755985104766e-02,
            -5.77027029648944159157e-03,
            -2.37630166566501626084e-05,
        ];
        const QQ: [f64; 5] = [
            3.97917223959155352819e-01,
            6.50222499887672944485e-02,
            5.08130628187576562776e-03,
            1.32494738004321644526e-04,
            -3.96022827877536812320e-06,
        ];
        if x < 1.3877787807814457e-17 {
            return 1.0 - x;
        }
        let z = x * x;
        let r = PP[0] + z * (PP[1] + z * (PP[2] + z * (PP[3] + z * PP[4])));
        let s = 1.0 + z * (QQ[0] + z * (QQ[1] + z * (QQ[2] + z * (QQ[3] + z * QQ[4]))));
        let y = r / s;
        return if x < 0.25 {
            1.0 - (x + x * y)
        } else {
            0.5 - (x - 0.5 + x * y)
        };
    }
    if x < 1.25 {
        const ERX: f64 = 8.45062911510467529297e-01;
        const PA: [f64; 7] = [
            -2.36211856075265944077e-03,
            4.14856118683748331666e-01,
            -3.72207876035701323847e-01,
            3.18346619901161753674e-01,
            -1.10894694282396677476e-01,
            3.54783043256182359371e-02,
            -2.16637559486879084300e-03,
        ];
        const QA: [f64; 6] = [
            1.06420880400844228286e-01,
            5.40397917702171048937e-01,
            7.18286544141962662868e-02,
            1.26171219808761642112e-01,
            1.36370839120290507362e-02,
            1.19844998467991074170e-02,
        ];
        let s = x - 1.0;
        let p =
            PA[0] + s * (PA[1] + s * (PA[2] + s * (PA[3] + s * (PA[4] + s * (PA[5] + s * PA[6])))));
        let q =
            1.0 + s * (QA[0] + s * (QA[1] + s * (QA[2] + s * (QA[3] + s * (QA[4] + s * QA[5])))));
        return 1.0 - ERX - p / q;
    }
    if x >= 28.0 {
        return 0.0;
    }
    let s = 1.0 / (x * x);
    let (r, big_s) = if x < 1.0 / 0.35 {
        const RA: [f64; 8] = [
            -9.86494403484714822705e-03,
            -6.93858572707181764372e-01,
            -1.05586262253232909814e+01,
            -6.23753324503260060396e+01,
            -1.62396669462573470355e+02,
            -1.84605092906711035994e+02,
            -8.12874355063065934246e+01,
            -9.81432934416914548592e+00,
        ];
        const SA: [f64; 8] = [
            1.96512716674392571292e+01,
            1.37657754143519042600e+02,
            4.34565877475229228821e+02,
            6.45387271733267880336e+02,
            4.29008140027567833386e+02,
            1.08635005541779435134e+02,
            6.57024977031928170135e+00,
            -6.04244152148580987438e-02,
        ];
        (
            RA[0]
                + s * (RA[1]
                    + s * (RA[2]
                        + s * (RA[3] + s * (RA[4] + s * (RA[5] + s * (RA[6] + s * RA[7])))))),
            1.0 + s
                * (SA[0]
                    + s * (SA[1]
                        + s * (SA[2]
                            + s * (SA[3] + s * (SA[4] + s * (SA[5] + s * (SA[6] + s * SA[7]))))))),
        )
    } else {
        const RB: [f64; 7] = [
            -9.86494292470009928597e-03,
            -7.99283237680523006574e-01,
            -1.77579549177547519889e+01,
            -1.60636384855821916062e+02,
            -6.37566443368389627722e+02,
            -1.02509513161107724954e+03,
            -4.83519191608651397019e+02,
        ];
        const SB: [f64; 7] = [
            3.03380607434824582924e+01,
            3.25792512996573918826e+02,
            1.53672958608443695994e+03,
            3.19985821950859553908e+03,
            2.55305040643316442583e+03,
            4.74528541206955367215e+02,
            -2.24409524465858183362e+01,
        ];
        (
            RB[0] + s * (RB[1] + s * (RB[2] + s * (RB[3] + s * (RB[4] + s * (RB[5] + s * RB[6]))))),
            1.0 + s
                * (SB[0]
                    + s * (SB[1]
                        + s * (SB[2] + s * (SB[3] + s * (SB[4] + s * (SB[5] + s * SB[6])))))),
        )
    };
    // exp(-x^2) with x^2 split so that its rounding error does not reach the result.
    let z = f64::from_bits(x.to_bits() & 0xffff_ffff_0000_0000);
    (-z * z - 0.5625).exp() * ((z - x) * (z + x) + r / big_s).exp() / x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_libm() {
        let mut worst = 0.0f64;
        for k in 0..300_000 {
            let x = -3.0 + k as f64 * 1e-4;
            let (got, want) = (erfc(x), libm::erfc(x));
            if want > 1e-300 {
                worst = worst.max(((got - want) / want).abs());
            } else {
                // Subnormal results carry fewer bits; only their size matters here.
                assert!((got - want).abs() < 1e-300, "{x}: {got} vs {want}");
            }
        }
        assert!(
            worst <= 8.0 * f64::EPSILON,
            "worst relative difference {worst}"
        );
        assert!(erfc(f64::NAN).is_nan());
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
    }
}
