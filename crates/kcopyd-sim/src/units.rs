//! Sizes, offsets and durations as people type them, and sizes as people read them: one
//! reading for the command line and for scenario files.
//!
//! ```text
//!  "4096"   4096 bytes        plain numbers are bytes, as in dd and qemu-img
//!  "8s"     8 × 512 bytes     s = 512-byte sectors
//!  "64K"    64 × 1024         K, M, G, T, P (or KiB, MiB, ...): binary, as in qemu-img
//!  "1.5G"   1536 MiB          a fraction is fine when the result is a whole number of bytes
//!  "1MB"    refused           decimal units are ambiguous between tools: say 1M or 1000000
//! ```

use std::fmt;

use thiserror::Error;

/// Bytes in a sector, the unit of the `s` suffix.
pub const SECTOR_BYTES: u64 = 512;

/// Why a size or duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Nothing was given.
    #[error("empty value")]
    Empty,
    /// The text does not start with a number.
    #[error("'{text}' is not a number")]
    NotANumber {
        /// What was given.
        text: String,
    },
    /// The unit after the number is not known.
    #[error(
        "unknown unit '{unit}' in '{text}' (use K, M, G, T, P or KiB, MiB, ... for powers of 1024, \
         s for 512-byte sectors, or no unit for bytes)"
    )]
    UnknownUnit {
        /// What was given.
        text: String,
        /// The unit.
        unit: String,
    },
    /// A fraction that does not come to a whole number of bytes.
    #[error("'{text}' is not a whole number of bytes")]
    Fraction {
        /// What was given.
        text: String,
    },
    /// The value does not fit in 64 bits.
    #[error("'{text}' is too large")]
    Overflow {
        /// What was given.
        text: String,
    },
    /// The unit after a duration's number is not a duration unit.
    #[error("unknown duration unit '{unit}' in '{text}' (use us, ms or s)")]
    UnknownDurationUnit {
        /// What was given.
        text: String,
        /// The unit.
        unit: String,
    },
    /// A duration without a unit.
    #[error("'{text}' needs a unit: us, ms or s")]
    DurationUnit {
        /// What was given.
        text: String,
    },
}

/// Splits `text` into its number and its unit.
fn split_number(text: &str) -> Result<(&str, &str), SizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let number = &text[..end];
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') || number.matches('.').count() > 1 {
        return Err(SizeError::NotANumber { text: text.to_owned() });
    }
    Ok((number, text[end..].trim()))
}

/// `number × multiplier`, exactly, where `number` may have a fraction.
///
/// Worked example: "1.5" × 1024³ = 15 × 1024³ / 10 = 1 610 612 736, a whole number, so
/// accepted; "0.3" × 1024 = 307.2, refused.
fn scale(text: &str, number: &str, multiplier: u64) -> Result<u64, SizeError> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = format!("{whole}{fraction}");
    let overflow = || SizeError::Overflow { text: text.to_owned() };
    let mantissa: u128 = digits.parse().map_err(|_| overflow())?;
    let divisor = 10u128.checked_pow(fraction.len() as u32).ok_or_else(overflow)?;
    let scaled = mantissa.checked_mul(u128::from(multiplier)).ok_or_else(overflow)?;
    if scaled % divisor != 0 {
        return Err(SizeError::Fraction { text: text.to_owned() });
    }
    u64::try_from(scaled / divisor).map_err(|_| overflow())
}

/// Reads a size in bytes: a number with an optional binary unit.
///
/// ```text
/// parse_size("2M") == Ok(2 << 20); parse_size("16s") == Ok(8192); parse_size("1MB") is an error
/// ```
///
/// # Errors
/// The text is empty, not a number, has an unknown unit, or does not fit in 64 bits.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let (number, unit) = split_number(text)?;
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "s" => SECTOR_BYTES,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "P" | "PiB" => 1 << 50,
        _ => return Err(SizeError::UnknownUnit { text: text.trim().to_owned(), unit: unit.to_owned() }),
    };
    scale(text.trim(), number, multiplier)
}

/// Reads a duration in microseconds: a number with a unit `us` (or `µs`), `ms` or `s`.
///
/// # Errors
/// No unit, an unknown unit, a fraction of a microsecond, or an overflow.
pub fn parse_duration_us(text: &str) -> Result<u64, SizeError> {
    let (number, unit) = split_number(text)?;
    let multiplier: u64 = match unit {
        "us" | "µs" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        // A number too large for any unit is too large, whatever unit it lacks.
        "" => {
            scale(text.trim(), number, 1)?;
            return Err(SizeError::DurationUnit { text: text.trim().to_owned() });
        }
        _ => return Err(SizeError::UnknownDurationUnit { text: text.trim().to_owned(), unit: unit.to_owned() }),
    };
    scale(text.trim(), number, multiplier)
}

/// Reads a rate in bytes per second: a size, optionally followed by `/s`.
///
/// # Errors
/// As [`parse_size`].
pub fn parse_rate(text: &str) -> Result<u64, SizeError> {
    parse_size(text.trim().strip_suffix("/s").unwrap_or(text))
}

/// A byte count for people: `512 B`, `4 KiB`, `1.50 GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        while unit + 1 < UNITS.len() && self.0 >= 1 << (10 * (unit + 1)) {
            unit += 1;
        }
        if unit == 0 {
            return write!(f, "{} B", self.0);
        }
        let divisor = (1u64 << (10 * unit)) as f64;
        if self.0 % (1 << (10 * unit)) == 0 {
            write!(f, "{} {}", self.0 >> (10 * unit), UNITS[unit])
        } else {
            // Rounded down, so that 4.5 KiB short of 256 MiB never reads as 256.00 MiB.
            let hundredths = (self.0 as f64 / divisor * 100.0).floor() / 100.0;
            write!(f, "{hundredths:.2} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units_sectors_and_exact_fractions() {
        let cases = [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("8s", 4096),
            ("1k", 1024),
            ("64K", 65536),
            ("64KiB", 65536),
            ("2M", 2 << 20),
            ("2MiB", 2 << 20),
            ("1G", 1 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1.5G", 3 << 29),
            (" 3M ", 3 << 20),
            ("0.5K", 512),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn malformed_sizes_say_what_is_wrong() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("abc"), Err(SizeError::NotANumber { .. })));
        assert!(matches!(parse_size("-1"), Err(SizeError::NotANumber { .. })));
        assert!(matches!(parse_size("1.2.3K"), Err(SizeError::NotANumber { .. })));
        assert!(matches!(parse_size(".5K"), Err(SizeError::NotANumber { .. })));
        assert!(matches!(parse_size("12Q"), Err(SizeError::UnknownUnit { unit, .. }) if unit == "Q"));
        assert!(matches!(parse_size("1MB"), Err(SizeError::UnknownUnit { .. })), "decimal units are refused");
        assert!(matches!(parse_size("0.3K"), Err(SizeError::Fraction { .. })));
        assert!(matches!(parse_size("16384P"), Err(SizeError::Overflow { .. })));
        assert!(matches!(parse_size("99999999999999999999999999999999999999999"), Err(SizeError::Overflow { .. })));
        let message = parse_size("12Q").unwrap_err().to_string();
        assert!(message.contains("'Q'") && message.contains("KiB"), "{message}");
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration_us("100us"), Ok(100));
        assert_eq!(parse_duration_us("100µs"), Ok(100));
        assert_eq!(parse_duration_us("2ms"), Ok(2000));
        assert_eq!(parse_duration_us("1.5s"), Ok(1_500_000));
        assert!(matches!(parse_duration_us("100"), Err(SizeError::DurationUnit { .. })));
        assert!(matches!(parse_duration_us("1h"), Err(SizeError::UnknownDurationUnit { .. })));
        let message = parse_duration_us("10h").unwrap_err().to_string();
        assert!(message.contains("'h'") && message.contains("us, ms or s") && !message.contains("KiB"), "{message}");
        assert_eq!(parse_rate("500M"), Ok(500 << 20));
        assert_eq!(parse_rate("500M/s"), Ok(500 << 20));
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(4096).to_string(), "4 KiB");
        assert_eq!(Bytes(3 << 29).to_string(), "1.50 GiB");
        assert_eq!(Bytes(1 << 30).to_string(), "1 GiB");
        assert_eq!(Bytes((256 << 20) - 4608).to_string(), "255.99 MiB");
    }
}
