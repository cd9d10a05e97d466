//! Shards: several `[cluster] redis` URLs are independent servers, and a channel lives on the
//! one a jump consistent hash of its name picks, so adding a shard moves about 1/n of the
//! channels and every node picks the same shard without asking anyone.

/// The shard of `channel` among `n` (n ≥ 1): Lamping and Veach's jump consistent hash over the
/// name's FNV-1a hash (the name is short, FNV is enough to spread it; the jump does the rest).
pub(super) fn shard_of(channel: &str, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let mut key = fnv1a(channel.as_bytes());
    let (mut b, mut j) = (-1i64, 0i64);
    while j < n as i64 {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::shard_of;

    #[test]
    fn spreads_and_moves_few_channels() {
        let names: Vec<String> = (0..10_000).map(|i| format!("chan-{i}")).collect();
        let mut per = [0usize; 4];
        for n in &names {
            per[shard_of(n, 4)] += 1;
            assert_eq!(shard_of(n, 1), 0);
        }
        assert!(per.iter().all(|c| (2000..3000).contains(c)), "{per:?}");
        // Going from 4 to 5 shards moves only what the new shard takes (about a fifth).
        let moved = names
            .iter()
            .filter(|n| shard_of(n, 4) != shard_of(n, 5))
            .count();
        assert!(moved > 1500 && moved < 2500, "{moved}");
        assert!(names
            .iter()
            .filter(|n| shard_of(n, 4) != shard_of(n, 5))
            .all(|n| shard_of(n, 5) == 4));
    }
}
