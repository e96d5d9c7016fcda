//! The UCI optical digits (Alpaydin & Kaynak, CC BY 4.0; see data/ATTRIBUTION.md): 1,797
//! images of 8x8 pixels with values 0..16, embedded in the binary, and a fixed stratified split
//! into train / val / test pools.

use crate::{DemoError, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::io::Read;

const CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

pub const NAMES: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digit {
    /// Row-major 8x8, values 0..=16.
    pub pixels: [u8; 64],
    pub label: u8,
}

/// All 1,797 digits, in file order.
pub fn load() -> Result<Vec<Digit>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| DemoError::Data(format!("digits.csv.gz: {e}")))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            parse_row(line).map_err(|e| DemoError::Data(format!("digits row {i}: {e}")))
        })
        .collect()
}

fn parse_row(line: &str) -> std::result::Result<Digit, String> {
    let values: Vec<u8> = line
        .split(',')
        .map(|v| {
            let x: f64 = v.trim().parse().map_err(|e| format!("{v:?}: {e}"))?;
            Ok(x as u8)
        })
        .collect::<std::result::Result<_, String>>()?;
    if values.len() != 65 {
        return Err(format!(
            "{} values, expected 64 pixels and a label",
            values.len()
        ));
    }
    if values[..64].iter().any(|&v| v > 16) || values[64] > 9 {
        return Err("a pixel is over 16 or the label over 9".into());
    }
    let mut pixels = [0u8; 64];
    pixels.copy_from_slice(&values[..64]);
    Ok(Digit {
        pixels,
        label: values[64],
    })
}

/// Indices into the digits of each split: disjoint, stratified by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pools {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

/// Shares of each label's images: 60% train, 15% val, the rest test.
pub fn pools(digits: &[Digit], seed: u64) -> Pools {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Pools {
        train: vec![],
        val: vec![],
        test: vec![],
    };
    for label in 0..10u8 {
        let mut idx: Vec<usize> = (0..digits.len())
            .filter(|&i| digits[i].label == label)
            .collect();
        idx.shuffle(&mut rng);
        let n_train = idx.len() * 60 / 100;
        let n_val = idx.len() * 15 / 100;
        out.train.extend_from_slice(&idx[..n_train]);
        out.val.extend_from_slice(&idx[n_train..n_train + n_val]);
        out.test.extend_from_slice(&idx[n_train + n_val..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_all_digits_and_splits_disjointly() {
        let d = load().unwrap();
        assert_eq!(d.len(), 1797);
        for l in 0..10 {
            let n = d.iter().filter(|x| x.label == l).count();
            assert!((170..=190).contains(&n), "label {l}: {n}");
        }
        let p = pools(&d, 1);
        assert_eq!(p.train.len() + p.val.len() + p.test.len(), d.len());
        let mut all: Vec<usize> = [p.train.clone(), p.val.clone(), p.test.clone()].concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), d.len());
        assert_eq!(p, pools(&d, 1));
        assert_ne!(p, pools(&d, 2));
    }

    #[test]
    fn rejects_bad_rows() {
        assert!(parse_row("1,2,3").is_err());
        let mut row = vec!["0"; 64];
        row.push("3");
        assert!(parse_row(&row.join(",")).is_ok());
        row[0] = "17";
        assert!(parse_row(&row.join(",")).is_err());
        row[0] = "x";
        assert!(parse_row(&row.join(",")).is_err());
    }
}
