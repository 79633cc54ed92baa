//! Values over virtual time in at most [`BUCKETS_MAX`] buckets, whatever the run's length.
//!
//! ```text
//!  width 1 µs:  [3][0][5][1] … 256 buckets full ─► width 2 µs: [3][6] … (pairs merged)
//! ```
//!
//! A bucket holds the sum and the largest of what fell in it. Widths are powers of two
//! microseconds, so series of different lengths can be brought to one width
//! ([`Series::coarsen_to`]) and read side by side.

/// Most buckets a series keeps; after a merge it has at least half as many.
pub const BUCKETS_MAX: usize = 256;

/// A time series with coarsening buckets.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    width_us: u64,
    sums: Vec<f64>,
    maxes: Vec<f64>,
}

impl Default for Series {
    fn default() -> Series {
        Series { width_us: 1, sums: Vec::new(), maxes: Vec::new() }
    }
}

impl Series {
    pub(crate) fn width_us(&self) -> u64 {
        self.width_us
    }

    /// Merges pairs of buckets until `at_us` falls in one.
    fn reach(&mut self, at_us: u64) -> usize {
        while at_us / self.width_us >= BUCKETS_MAX as u64 {
            self.coarsen();
        }
        let index = (at_us / self.width_us) as usize;
        if self.sums.len() <= index {
            self.sums.resize(index + 1, 0.0);
            self.maxes.resize(index + 1, 0.0);
        }
        index
    }

    fn coarsen(&mut self) {
        self.width_us *= 2;
        let pairs = self.sums.len().div_ceil(2);
        for i in 0..pairs {
            let (a, b) = (2 * i, 2 * i + 1);
            self.sums[i] = self.sums[a] + self.sums.get(b).copied().unwrap_or(0.0);
            self.maxes[i] = self.maxes[a].max(self.maxes.get(b).copied().unwrap_or(0.0));
        }
        self.sums.truncate(pairs);
        self.maxes.truncate(pairs);
    }

    /// Coarsens to `width_us` (a power of two no smaller than the current width).
    pub(crate) fn coarsen_to(&mut self, width_us: u64) {
        assert!(width_us.is_power_of_two() && width_us >= self.width_us);
        while self.width_us < width_us {
            self.coarsen();
        }
    }

    /// Adds `value` at `at_us`.
    pub(crate) fn add(&mut self, at_us: u64, value: f64) {
        let index = self.reach(at_us);
        self.sums[index] += value;
        self.maxes[index] = self.maxes[index].max(value);
    }

    /// Adds `level × time` for every microsecond of `from_us..to_us` (an integral, e.g. of the
    /// requests in flight); each bucket's largest is the level.
    pub(crate) fn add_span(&mut self, from_us: u64, to_us: u64, level: f64) {
        if from_us >= to_us || level == 0.0 {
            return;
        }
        self.reach(to_us);
        let mut at = from_us;
        while at < to_us {
            let index = (at / self.width_us) as usize;
            let bucket_end = (index as u64 + 1) * self.width_us;
            let end = bucket_end.min(to_us);
            self.sums[index] += level * (end - at) as f64;
            self.maxes[index] = self.maxes[index].max(level);
            at = end;
        }
    }

    /// The sums, padded with zeroes to `len` buckets.
    pub(crate) fn sums(&self, len: usize) -> Vec<f64> {
        let mut out = self.sums.clone();
        out.resize(len.max(out.len()), 0.0);
        out
    }

    /// The largest values, padded with zeroes to `len` buckets.
    pub(crate) fn maxes(&self, len: usize) -> Vec<f64> {
        let mut out = self.maxes.clone();
        out.resize(len.max(out.len()), 0.0);
        out
    }

    /// Buckets in use.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.sums.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_merge_and_keep_totals() {
        let mut series = Series::default();
        for t in 0..10_000u64 {
            series.add(t, 1.0);
        }
        assert!(series.len() <= BUCKETS_MAX && series.len() > BUCKETS_MAX / 4);
        assert_eq!(series.sums(0).iter().sum::<f64>(), 10_000.0);
        assert_eq!(series.width_us(), 64);
    }

    #[test]
    fn spans_integrate_across_buckets() {
        let mut series = Series::default();
        series.add_span(0, 1000, 2.0);
        series.add_span(500, 1500, 1.0);
        assert_eq!(series.sums(0).iter().sum::<f64>(), 3000.0);
        let width = series.width_us();
        series.coarsen_to(width * 4);
        assert_eq!(series.sums(0).iter().sum::<f64>(), 3000.0);
        assert_eq!(series.maxes(0)[0], 2.0);
    }
}
