//! The statistics the gate and the watch decide with: Wilson intervals,
//! seeded (paired) bootstrap intervals, McNemar's exact test, and the one-sided
//! two-proportion z-test.

use rand::{Rng, SeedableRng};

/// 95% Wilson score interval of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054;
    let (n, p) = (n as f64, k as f64 / n as f64);
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * ((p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt()) / d;
    ((c - h).max(0.0), (c + h).min(1.0))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

/// 95% percentile-bootstrap interval of the mean of `x` (seeded).
pub fn bootstrap_mean(x: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    paired_bootstrap(x, &vec![0.0; x.len()], resamples, seed)
}

/// 95% percentile-bootstrap interval of the mean paired difference `a - b`:
/// each resample draws examples, both scores of an example together.
pub fn paired_bootstrap(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    let n = a.len().min(b.len());
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| (0..n).map(|_| d[rng.gen_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(|x, y| x.total_cmp(y));
    (percentile(&means, 0.025), percentile(&means, 0.975))
}

/// Two-sided exact McNemar p-value from the discordant pairs: `b` examples only
/// the first system gets right, `c` only the second.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X <= k) for X ~ Binomial(n, 1/2), in logs
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 through erf; |error| < 1.5e-7).
pub fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * (x.abs() / std::f64::consts::SQRT_2));
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t
            + 0.254_829_592)
            * t
            * (-(x * x) / 2.0).exp();
    if x >= 0.0 {
        0.5 * (1.0 + y)
    } else {
        0.5 * (1.0 - y)
    }
}

/// One-sided two-proportion z-test (pooled): the p-value of "rate 1 is higher
/// than rate 2", with `k1` of `n1` and `k2` of `n2`. Returns (z, p).
pub fn two_proportion_greater(k1: usize, n1: usize, k2: usize, n2: usize) -> (f64, f64) {
    if n1 == 0 || n2 == 0 {
        return (0.0, 1.0);
    }
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let p = (k1 + k2) as f64 / (n1 + n2) as f64;
    let se = (p * (1.0 - p) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    if se == 0.0 {
        return (0.0, if p1 > p2 { 0.0 } else { 1.0 });
    }
    let z = (p1 - p2) / se;
    (z, 1.0 - normal_cdf(z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn against_published_values() {
        // Wilson 95% for 81/263 (Newcombe 1998, table I): 0.2553 to 0.3662
        let (lo, hi) = wilson(81, 263);
        assert!(
            (lo - 0.2553).abs() < 1e-4 && (hi - 0.3662).abs() < 1e-4,
            "{lo} {hi}"
        );
        // scipy.stats.binomtest(3, 15).pvalue = 0.03515625
        assert!((mcnemar_exact(3, 12) - 0.035_156_25).abs() < 1e-9);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-1.0) - 0.158_655_25).abs() < 1e-6);
        // 30/100 vs 10/100: z = 3.5355
        let (z, p) = two_proportion_greater(30, 100, 10, 100);
        assert!((z - 3.535_534).abs() < 1e-5 && p < 0.001, "{z} {p}");
        assert!(two_proportion_greater(10, 100, 30, 100).1 > 0.99);
    }

    #[test]
    fn paired_bootstrap_sees_a_consistent_gain_that_two_intervals_would_miss() {
        // b beats a on 12 of 200 examples and never loses: both accuracies' own
        // intervals overlap, the paired difference is clearly above zero
        let a: Vec<f64> = (0..200).map(|i| (i % 2 == 0) as u8 as f64).collect();
        let mut b = a.clone();
        let mut flipped = 0;
        for x in b.iter_mut() {
            if *x == 0.0 && flipped < 12 {
                *x = 1.0;
                flipped += 1;
            }
        }
        let (lo, hi) = paired_bootstrap(&b, &a, 2000, 1);
        assert!(lo > 0.0 && hi < 0.2, "{lo} {hi}");
        let ka = a.iter().filter(|x| **x == 1.0).count();
        let kb = b.iter().filter(|x| **x == 1.0).count();
        assert!(
            wilson(kb, 200).0 < wilson(ka, 200).1,
            "the intervals overlap"
        );
        // the same seed gives the same interval
        assert_eq!(paired_bootstrap(&b, &a, 2000, 1), (lo, hi));
        let (lo, hi) = bootstrap_mean(&a, 2000, 3);
        assert!(lo < 0.5 && hi > 0.5);
    }
}
