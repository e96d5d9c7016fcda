//! Random parts of a block for aTLAS×K: element j of a block belongs to one of K parts, chosen by
//! a hash of (seed, block name, j). Nothing of block size is stored; the assignment is recomputed
//! where it is needed and is the same on every machine and in the Python fixture script:
//!
//! ```text
//! key(seed, name) = splitmix64(seed ^ fnv1a64(name))
//! part(j)         = ((splitmix64(key + j) >> 32) * K) >> 32        (all arithmetic mod 2^64)
//! ```

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The per-block key the parts of that block are drawn from.
pub fn block_key(seed: u64, block_name: &str) -> u64 {
    splitmix64(seed ^ fnv1a64(block_name.as_bytes()))
}

/// The part (0..k) of element `j` of the block with key `key`.
#[inline]
pub fn part_of(key: u64, j: usize, k: usize) -> usize {
    (((splitmix64(key.wrapping_add(j as u64)) >> 32) * k as u64) >> 32) as usize
}

/// Part ids of elements `start..start + out.len()`.
pub fn fill_parts(key: u64, k: usize, start: usize, out: &mut [u8]) {
    for (j, p) in out.iter_mut().enumerate() {
        *p = part_of(key, start + j, k) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // splitmix64 reference outputs for seed 0 (from the published reference implementation).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn parts_are_balanced_and_depend_on_name_and_seed() {
        let k = 4;
        let key = block_key(7, "layer.weight");
        let mut counts = [0usize; 4];
        for j in 0..40_000 {
            counts[part_of(key, j, k)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        let other = block_key(7, "layer.bias");
        let seeded = block_key(8, "layer.weight");
        let same = |a: u64, b: u64| (0..256).all(|j| part_of(a, j, k) == part_of(b, j, k));
        assert!(!same(key, other));
        assert!(!same(key, seeded));
        assert!(same(key, block_key(7, "layer.weight")));
    }
}
