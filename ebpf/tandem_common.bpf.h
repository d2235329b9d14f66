/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maps and the marking / in-flight logic shared by the two flavours of the programs:
 * tandem.bpf.c (tp_btf, CO-RE) and tandem_classic.bpf.c (classic tracepoints, no CO-RE, so that it
 * loads on a kernel without BTF). Nothing in here may use CO-RE relocations.
 *
 * The toggle protocol across the kernel boundary (the destage toggle of seed 003, Fig. 5):
 *   - a queued write bio reads its range's `current` side, counts itself queued on that side,
 *     remembers the side in the `inflight` table and sets its tracks' bits on that side; its
 *     completion (of its request, or of the bio on bio-based drivers) releases the count. A bio
 *     the block layer splits counts its split-off part as one more write, on the side current
 *     at the split (and marks its tracks there again), so the remainder's completion cannot
 *     release a part still in flight;
 *   - userspace toggles a range by storing the other side into `current`, then waits for an RCU
 *     grace period (every program that read the old value has then returned: see
 *     userspace/bpf/src/sys.rs), then waits until the old side's completed count equals its
 *     queued count (summed over CPUs): every write queued
 *     before the toggle has then completed, and its bit is set on the old side;
 *   - only then does it copy the old side's tracks and clear the old side.
 * A bio spanning several ranges is counted on both sides of each (a later drain of either side
 * waits for it) and marked on each range's current side.
 *
 * A missed completion can only delay a drain, never shorten it: the count stays up. Misses
 * happen (Linux 6.18, loop: a few per 100k requests complete without block_rq_complete reaching
 * the tp_btf program; the classic programs are skipped whenever they fire while another BPF
 * tracing program runs on that CPU). Recovery: a bio address queued again releases its stale
 * slot; the tp_btf reaper (tandem_reap) releases slots whose bio is provably done; the classic
 * flavour, which cannot look at a bio, releases slots older than the block layer's I/O timeout.
 */
#ifndef TANDEM_COMMON_BPF_H
#define TANDEM_COMMON_BPF_H

#include "tandem.h"

#define TANDEM_MARK_CURRENT 3u /* mark_ctx.side: each range's current side */
#define TANDEM_MAX_LOOPS (1u << 23)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tandem_params);
} params SEC(".maps");

/* Filled by the loader before loading (see struct tandem_consts): constants to the verifier. */
const volatile struct tandem_consts consts = {
	.range_shift = TANDEM_NO_SHIFT,
	/* rwbs offsets on Linux 6.18 (classic flavour; the loader reads the running kernel's) */
	.tp = {
		.bio_queue_rwbs = 28,
		.split_rwbs = 32,
		.rq_complete_rwbs = 34,
		.bio_complete_rwbs = 32,
	},
};

/* The watched devices, for userspace and bpftool: the programs test consts.devs, the same set. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TANDEM_MAX_DEVICES);
	__type(key, __u32);
	__type(value, __u32);
} devices SEC(".maps");

/* max_entries is set by the loader: ranges * 2 * words_per_range */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} bitmap SEC(".maps");

/* max_entries is set by the loader: ranges */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tandem_range);
} ranges SEC(".maps");

/* max_entries is set by the loader: cpus * counters_per_cpu */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, TANDEM_INFLIGHT_SLOTS);
	__type(key, __u32);
	__type(value, struct tandem_bio);
} inflight SEC(".maps");

/*
 * The clock, read once per scheduler tick: bpf_ktime_get_ns() reads the clock source with an
 * ordered rdtsc, which waits for the program's outstanding cache misses; per bio it was about a
 * third of the queue program's cost (bpf_ktime_get_coarse_ns is not allowed in tracing
 * programs). bpf_jiffies64() is a plain load. Two programs refreshing it at once can pair a
 * jiffies value with the clock read for the previous one: a time a tick older, which only
 * makes an age look a tick longer.
 */
struct tandem_clock {
	__u64 jiffies;
	__u64 ns;
};

static struct tandem_clock clock_cache;

/* CLOCK_MONOTONIC nanoseconds, at most a tick or two behind (never ahead). */
static __always_inline __u64 tandem_now(void)
{
	__u64 j = bpf_jiffies64();

	if (*(volatile __u64 *)&clock_cache.jiffies != j) {
		clock_cache.ns = bpf_ktime_get_ns();
		*(volatile __u64 *)&clock_cache.jiffies = j;
		return clock_cache.ns;
	}
	return *(volatile __u64 *)&clock_cache.ns;
}

/* A device this instance records. */
static __always_inline int tandem_watched(__u32 dev)
{
	return dev == consts.devs[0] || (consts.devs[1] != 0 && dev == consts.devs[1]);
}

/* The range of a track: a shift for the usual power-of-two ranges (the verifier removes the
 * branch not taken), a 64-bit division otherwise. */
static __always_inline __u64 tandem_range_of(__u64 track)
{
	if (consts.range_shift != TANDEM_NO_SHIFT)
		return track >> (consts.range_shift & 63);
	return track / consts.tracks_per_range;
}

struct mark_ctx {
	__u64 track; /* next track to mark */
	__u64 last;  /* last track to mark, inclusive */
	__u32 side;  /* 0 or 1, TANDEM_SIDE_BOTH or TANDEM_MARK_CURRENT */
	__u32 counted_range;
};

/* Sets bits; returns 1 if some were not set yet. No atomic when they all are (the common case
 * of a hot track, and no cache line written). */
static __always_inline int tandem_set_bits(__u64 range, __u32 side, __u64 word, __u64 mask)
{
	__u32 idx = (__u32)((range * 2 + side) * consts.words_per_range + word);
	__u64 *w = bpf_map_lookup_elem(&bitmap, &idx);

	if (!w || (*(volatile __u64 *)w & mask) == mask)
		return 0;
	return (__sync_fetch_and_or(w, mask) & mask) != mask;
}

/* Marks the run of tracks from c->track to the end of its bitmap word (or range, or span).
 * Returns 1 when done (or on a bad map index), 0 when tracks are left. */
static __always_inline long tandem_mark_word(struct mark_ctx *c)
{
	__u64 t = c->track, tpr = consts.tracks_per_range;
	__u64 r, i, bit, end, rend, n, mask;
	struct tandem_range *rs;
	__u32 rk, side;
	int fresh;

	if (t > c->last || tpr == 0)
		return 1;
	r = tandem_range_of(t);
	i = t - r * tpr;
	bit = i & 63;
	end = t + (63 - bit);
	rend = r * tpr + tpr - 1;
	if (end > rend)
		end = rend;
	if (end > c->last)
		end = c->last;
	n = end - t + 1;
	mask = n >= 64 ? ~0ULL : ((1ULL << n) - 1);
	mask <<= bit;

	rk = (__u32)r;
	rs = bpf_map_lookup_elem(&ranges, &rk);
	if (!rs)
		return 1;
	side = c->side;
	if (side == TANDEM_MARK_CURRENT)
		side = *(volatile __u32 *)&rs->current & 1;
	/* marked[]: once per bio and range, and only when it set new bits */
	if (side == TANDEM_SIDE_BOTH) {
		fresh = tandem_set_bits(r, 0, i >> 6, mask);
		fresh |= tandem_set_bits(r, 1, i >> 6, mask);
		if (fresh && rk != c->counted_range) {
			c->counted_range = rk;
			__sync_fetch_and_add(&rs->marked[0], 1);
			__sync_fetch_and_add(&rs->marked[1], 1);
		}
	} else {
		side &= 1;
		fresh = tandem_set_bits(r, side, i >> 6, mask);
		if (fresh && rk != c->counted_range) {
			c->counted_range = rk;
			__sync_fetch_and_add(&rs->marked[side], 1);
		}
	}
	c->track = end + 1;
	return 0;
}

/* bpf_loop callback: the words after the first of a bio spanning several. */
static long tandem_mark_step(__u64 index, void *arg)
{
	return tandem_mark_word(arg);
}

/* Counts a bio of `range` on `k` (TANDEM_QUEUED or TANDEM_COMPLETED, plus the side) of this CPU. */
static __always_inline void tandem_bump(__u32 range, __u32 k)
{
	__u32 cpu = bpf_get_smp_processor_id(), idx;
	__u64 *c;

	if (cpu >= consts.cpus)
		cpu = 0;
	idx = cpu * consts.counters_per_cpu + range * 4 + k;
	c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		__sync_fetch_and_add(c, 1);
}

struct account_ctx {
	__u32 range;
	__u32 last;
	__u32 k;
	__u32 pad;
};

static long tandem_account_step(__u64 index, void *arg)
{
	struct account_ctx *a = arg;
	__u32 rk = a->range;

	if (rk > a->last)
		return 1;
	tandem_bump(rk, a->k);
	tandem_bump(rk, a->k + 1);
	a->range = rk + 1;
	return 0;
}

/* Counts a bio as queued (TANDEM_QUEUED) or completed (TANDEM_COMPLETED) on the side(s) it was
 * counted on. */
static __always_inline void tandem_account(const struct tandem_bio *b, __u32 k)
{
	struct account_ctx a = {};
	__u32 n;

	if (b->side != TANDEM_SIDE_BOTH) {
		tandem_bump(b->first_range, k + (b->side & 1));
		return;
	}
	if (b->last_range < b->first_range)
		return;
	a.range = b->first_range;
	a.last = b->last_range;
	a.k = k;
	n = b->last_range - b->first_range + 1;
	if (n > TANDEM_MAX_LOOPS)
		n = TANDEM_MAX_LOOPS;
	bpf_loop(n, tandem_account_step, &a, 0);
}

static __always_inline __u32 tandem_home_slot(__u64 id)
{
	return (__u32)((id * 0x9e3779b97f4a7c15ULL) >> (64 - TANDEM_INFLIGHT_BITS));
}

/*
 * The k-th slot an id may take: only slots 4n and 4n + 3, the two of every four 48-byte slots
 * that lie within one cache line each (the inflight array is page-aligned: BPF_F_MMAPABLE).
 * A slot's line moves between the CPU that queues a bio and the one that completes it; a slot
 * across two lines would move both.
 */
static __always_inline __u32 tandem_probe_slot(__u32 home, __u32 k)
{
	return ((home & ~3u) + (k >> 1) * 4 + (k & 1) * 3) & (TANDEM_INFLIGHT_SLOTS - 1);
}

/*
 * Releases the slot holding `id` if this caller wins it; copies what the counts need into
 * `out` first (a released slot can be claimed and overwritten at once).
 *
 * The first compare-and-swap changes nothing: it fetches the slot's line for writing, with
 * the key, in one transfer from the CPU that queued the bio (a plain read would fetch it
 * shared, and the release would then need a second transfer to own it).
 */
static __always_inline int tandem_release(struct tandem_bio *slot, __u64 id, struct tandem_bio *out)
{
	if (__sync_val_compare_and_swap(&slot->key, id, id) != id)
		return 0;
	out->key = id;
	out->first_range = slot->first_range;
	out->last_range = slot->last_range;
	out->side = slot->side;
	out->sector = slot->sector;
	return __sync_val_compare_and_swap(&slot->key, id, 0) == id;
}

/* Fills a claimed slot (key TANDEM_KEY_FILLING), then publishes it under rec->key: nobody
 * (reaper, userspace) judges a slot by the fields of its previous bio. The publication fails
 * only if userspace took the slot meanwhile. */
static __always_inline int tandem_fill(struct tandem_bio *slot, const struct tandem_bio *rec)
{
	slot->first_range = rec->first_range;
	slot->last_range = rec->last_range;
	slot->side = rec->side;
	slot->dev = rec->dev;
	slot->queued_ns = rec->queued_ns;
	slot->sector = rec->sector;
	slot->bytes = rec->bytes;
	return __sync_val_compare_and_swap(&slot->key, TANDEM_KEY_FILLING, rec->key) == TANDEM_KEY_FILLING ? 0 : -1;
}

/*
 * Claims a slot for `rec` (rec->key set). `unique_key`: the id cannot belong to another bio
 * still in flight (tp_btf: the bio's address), so a slot already holding it is stale (its
 * completion was missed) and is released first. Otherwise (classic) a slot holding it is
 * another write in flight: returns -1 and the caller records this one as untracked.
 *
 * Straight compare-and-swap, no read first: the home slot is almost always free, and its line
 * was last written by the CPU that completed the slot's previous bio, so a read would fetch it
 * shared and the swap fetch it again to own it.
 */
static __always_inline int tandem_claim(struct tandem_bio *rec, int unique_key)
{
	__u32 home = tandem_home_slot(rec->key), idx, i;
	struct tandem_bio *slot, *same = 0, stale;
	__u64 seen;

#pragma unroll
	for (i = 0; i < TANDEM_INFLIGHT_PROBES; i++) {
		idx = tandem_probe_slot(home, i);
		slot = bpf_map_lookup_elem(&inflight, &idx);
		if (!slot)
			return -1;
		seen = __sync_val_compare_and_swap(&slot->key, 0, TANDEM_KEY_FILLING);
		if (seen == 0)
			return tandem_fill(slot, rec);
		if (seen == rec->key) {
			same = slot;
			break;
		}
	}
	if (!same || !unique_key)
		return -1;
	if (tandem_release(same, rec->key, &stale))
		tandem_account(&stale, TANDEM_COMPLETED);
	if (__sync_val_compare_and_swap(&same->key, 0, TANDEM_KEY_FILLING) != 0)
		return -1;
	return tandem_fill(same, rec);
}

/* The slot holding `id`, if any, found with plain reads (no line taken from its owner). */
static __always_inline struct tandem_bio *tandem_find(__u64 id)
{
	__u32 home = tandem_home_slot(id), idx, i;
	struct tandem_bio *slot;

#pragma unroll
	for (i = 0; i < TANDEM_INFLIGHT_PROBES; i++) {
		idx = tandem_probe_slot(home, i);
		slot = bpf_map_lookup_elem(&inflight, &idx);
		if (slot && *(volatile __u64 *)&slot->key == id)
			return slot;
	}
	return 0;
}

/*
 * A write bio of `bytes` at `sector` of a watched device `dev` is queued; `id` identifies it
 * until completion (never 0).
 */
static __always_inline void tandem_queue(__u32 dev, __u64 sector, __u64 bytes, __u64 id, int unique_key)
{
	struct tandem_range *rs;
	struct tandem_bio rec = {};
	struct mark_ctx c = {};
	__u64 vs = consts.start_sector, ve = vs + consts.nr_sectors, s, end, first, last, loops;
	__u32 rk;

	if (bytes == 0 || consts.tracks == 0 || consts.track_shift > 63)
		return;
	s = sector;
	end = sector + ((bytes + 511) >> 9);
	if (end <= vs || s >= ve)
		return;
	if (s < vs)
		s = vs;
	if (end > ve)
		end = ve;
	first = ((s - vs) << 9) >> consts.track_shift;
	last = ((((end - vs) << 9) - 1) >> consts.track_shift);
	if (last >= consts.tracks)
		last = consts.tracks - 1;
	if (first > last)
		return;

	rec.key = id;
	rec.first_range = (__u32)tandem_range_of(first);
	rec.last_range = (__u32)tandem_range_of(last);
	rec.dev = dev;
	rec.queued_ns = tandem_now();
	rec.sector = sector;
	rec.bytes = (__u32)bytes;
	if (rec.first_range == rec.last_range) {
		rk = rec.first_range;
		rs = bpf_map_lookup_elem(&ranges, &rk);
		if (!rs)
			return;
		rec.side = *(volatile __u32 *)&rs->current & 1;
	} else {
		rec.side = TANDEM_SIDE_BOTH;
	}

	if (tandem_claim(&rec, unique_key) == 0) {
		tandem_account(&rec, TANDEM_QUEUED);
		c.side = rec.side == TANDEM_SIDE_BOTH ? TANDEM_MARK_CURRENT : rec.side;
	} else {
		rk = rec.first_range;
		rs = bpf_map_lookup_elem(&ranges, &rk);
		if (rs)
			__sync_fetch_and_add(&rs->untracked, 1);
		c.side = TANDEM_SIDE_BOTH;
	}

	c.track = first;
	c.last = last;
	c.counted_range = ~0u;
	/* the first word inline: a bio of a few KiB marks one */
	tandem_mark_word(&c);
	if (c.track <= last) {
		/* one step per bitmap word, plus one per range boundary */
		loops = ((last - c.track) >> 6) + (rec.last_range - rec.first_range) + 2;
		if (loops > TANDEM_MAX_LOOPS)
			loops = TANDEM_MAX_LOOPS;
		bpf_loop(loops, tandem_mark_step, &c, 0);
	}
}

/* The bio identified by `id` completed: release its slot and its counts. */
static __always_inline void tandem_complete(__u64 id)
{
	__u32 home = tandem_home_slot(id), idx, i;
	struct tandem_bio *slot, done;

#pragma unroll
	for (i = 0; i < TANDEM_INFLIGHT_PROBES; i++) {
		idx = tandem_probe_slot(home, i);
		slot = bpf_map_lookup_elem(&inflight, &idx);
		if (!slot)
			return;
		if (tandem_release(slot, id, &done)) {
			tandem_account(&done, TANDEM_COMPLETED);
			return;
		}
	}
}

#endif /* TANDEM_COMMON_BPF_H */
