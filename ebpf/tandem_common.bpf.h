/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maps and the marking / in-flight logic shared by the two flavours of the programs:
 * tandem.bpf.c (tp_btf, CO-RE) and tandem_classic.bpf.c (classic tracepoints, no CO-RE, so that it
 * loads on a kernel without BTF). Nothing in here may use CO-RE relocations.
 *
 * The toggle protocol across the kernel boundary (the destage toggle of seed 003, Fig. 5):
 *   - a queued write bio reads its range's `current` side, counts itself queued on that side,
 *     remembers the side in the `inflight` hash and sets its tracks' bits on that side; its
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

struct mark_ctx {
	__u64 track; /* next track to mark */
	__u64 last;  /* last track to mark, inclusive */
	__u64 tpr;   /* tracks per range */
	__u32 wpr;   /* words per side of a range */
	__u32 side;  /* 0 or 1, TANDEM_SIDE_BOTH or TANDEM_MARK_CURRENT */
	__u32 counted_range;
	__u32 pad;
};

/* Sets bits; returns 1 if some were not set yet. No atomic when they all are (the common case
 * of a hot track, and no cache line written). */
static __always_inline int tandem_set_bits(__u64 range, __u32 side, __u32 wpr, __u64 word, __u64 mask)
{
	__u32 idx = (__u32)((range * 2 + side) * wpr + word);
	__u64 *w = bpf_map_lookup_elem(&bitmap, &idx);

	if (!w || (*(volatile __u64 *)w & mask) == mask)
		return 0;
	return (__sync_fetch_and_or(w, mask) & mask) != mask;
}

/* Marks the run of tracks from c->track to the end of its bitmap word (or range, or span). */
static long tandem_mark_step(__u64 index, void *arg)
{
	struct mark_ctx *c = arg;
	__u64 t = c->track, tpr = c->tpr;
	__u64 r, i, bit, end, rend, n, mask;
	struct tandem_range *rs;
	__u32 rk, side;
	int fresh;

	if (t > c->last || tpr == 0)
		return 1;
	r = t / tpr;
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
		fresh = tandem_set_bits(r, 0, c->wpr, i >> 6, mask);
		fresh |= tandem_set_bits(r, 1, c->wpr, i >> 6, mask);
		if (fresh && rk != c->counted_range) {
			c->counted_range = rk;
			__sync_fetch_and_add(&rs->marked[0], 1);
			__sync_fetch_and_add(&rs->marked[1], 1);
		}
	} else {
		side &= 1;
		fresh = tandem_set_bits(r, side, c->wpr, i >> 6, mask);
		if (fresh && rk != c->counted_range) {
			c->counted_range = rk;
			__sync_fetch_and_add(&rs->marked[side], 1);
		}
	}
	c->track = end + 1;
	return 0;
}

/* Counts a bio of `range` on `k` (TANDEM_QUEUED or TANDEM_COMPLETED, plus the side) of this CPU. */
static __always_inline void tandem_bump(__u32 range, __u32 k)
{
	struct tandem_params *p;
	__u32 zero = 0, cpu = bpf_get_smp_processor_id(), idx;
	__u64 *c;

	p = bpf_map_lookup_elem(&params, &zero);
	if (!p)
		return;
	if (cpu >= p->cpus)
		cpu = 0;
	idx = cpu * p->counters_per_cpu + range * 4 + k;
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

/* Releases the slot holding `id` if this caller wins it; returns the slot's content then. */
static __always_inline int tandem_release(struct tandem_bio *slot, __u64 id, struct tandem_bio *out)
{
	*out = *slot;
	if (out->key != id)
		return 0;
	return __sync_val_compare_and_swap(&slot->key, id, 0) == id;
}

/*
 * Claims a slot for `rec` (rec->key set). `unique_key`: the id cannot belong to another bio
 * still in flight (tp_btf: the bio's address), so a slot already holding it is stale (its
 * completion was missed) and is released first. Otherwise (classic) a slot holding it is
 * another write in flight: returns -1 and the caller records this one as untracked.
 */
static __always_inline int tandem_claim(struct tandem_bio *rec, int unique_key)
{
	__u32 home = tandem_home_slot(rec->key), idx, i;
	struct tandem_bio *slot, stale;

#pragma unroll
	for (i = 0; i < TANDEM_INFLIGHT_PROBES; i++) {
		idx = (home + i) & (TANDEM_INFLIGHT_SLOTS - 1);
		slot = bpf_map_lookup_elem(&inflight, &idx);
		if (!slot)
			return -1;
		if (*(volatile __u64 *)&slot->key == rec->key) {
			if (!unique_key)
				return -1;
			if (tandem_release(slot, rec->key, &stale))
				tandem_account(&stale, TANDEM_COMPLETED);
		}
		if (*(volatile __u64 *)&slot->key == 0 &&
		    __sync_val_compare_and_swap(&slot->key, 0, rec->key) == 0) {
			slot->first_range = rec->first_range;
			slot->last_range = rec->last_range;
			slot->side = rec->side;
			slot->dev = rec->dev;
			slot->queued_ns = rec->queued_ns;
			slot->sector = rec->sector;
			slot->bytes = rec->bytes;
			return 0;
		}
	}
	return -1;
}

/* The slot holding `id`, if any. */
static __always_inline struct tandem_bio *tandem_find(__u64 id)
{
	__u32 home = tandem_home_slot(id), idx, i;
	struct tandem_bio *slot;

#pragma unroll
	for (i = 0; i < TANDEM_INFLIGHT_PROBES; i++) {
		idx = (home + i) & (TANDEM_INFLIGHT_SLOTS - 1);
		slot = bpf_map_lookup_elem(&inflight, &idx);
		if (slot && *(volatile __u64 *)&slot->key == id)
			return slot;
	}
	return 0;
}

/*
 * A write bio of `bytes` at `sector` of `dev` is queued; `id` identifies it until completion
 * (never 0).
 */
static __always_inline void tandem_queue(__u32 dev, __u64 sector, __u64 bytes, __u64 id, int unique_key)
{
	struct tandem_params *p;
	struct tandem_range *rs;
	struct tandem_bio rec = {};
	struct mark_ctx c = {};
	__u64 vs, ve, s, end, first, last, tpr, loops;
	__u32 zero = 0, rk;

	if (bytes == 0)
		return;
	if (!bpf_map_lookup_elem(&devices, &dev))
		return;
	p = bpf_map_lookup_elem(&params, &zero);
	if (!p || p->tracks == 0 || p->tracks_per_range == 0 || p->track_shift > 63)
		return;
	vs = p->start_sector;
	ve = vs + p->nr_sectors;
	s = sector;
	end = sector + ((bytes + 511) >> 9);
	if (end <= vs || s >= ve)
		return;
	if (s < vs)
		s = vs;
	if (end > ve)
		end = ve;
	first = ((s - vs) << 9) >> p->track_shift;
	last = ((((end - vs) << 9) - 1) >> p->track_shift);
	if (last >= p->tracks)
		last = p->tracks - 1;
	if (first > last)
		return;
	tpr = p->tracks_per_range;

	rec.key = id;
	rec.first_range = (__u32)(first / tpr);
	rec.last_range = (__u32)(last / tpr);
	rec.dev = dev;
	rec.queued_ns = bpf_ktime_get_ns();
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
	c.tpr = tpr;
	c.wpr = p->words_per_range;
	c.counted_range = ~0u;
	tandem_mark_step(0, &c);
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
	struct tandem_bio *slot = tandem_find(id);
	struct tandem_bio done;

	if (slot && tandem_release(slot, id, &done))
		tandem_account(&done, TANDEM_COMPLETED);
}

#endif /* TANDEM_COMMON_BPF_H */
