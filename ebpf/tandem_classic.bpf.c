// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tandem's write recording, fallback flavour: the classic block tracepoints, read through their
 * record layout (/sys/kernel/tracing/events/block/<event>/format). No CO-RE relocation anywhere,
 * so this object loads on a kernel without BTF; it costs more per bio than tp_btf (the
 * tracepoint formats its whole record, rwbs string and comm included, before we run).
 *
 * The classic events carry no bio pointer. A bio is identified from queue to completion by
 * (dev, end sector), which stays the same while the block layer advances a bio. A request's
 * completion (dev, sector, nr_sector) is attributed to its bios by walking back from its end
 * sector through each bio's recorded start sector. A second write in flight with the same
 * (dev, end sector) is recorded as untracked (marked on both sides, not counted).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#include "tandem_common.bpf.h"

#define TANDEM_MAX_RQ_BIOS 4096u

/* The fields every one of the four events has at these offsets. */
struct tandem_tp_head {
	__u64 common;    /* common_type, common_flags, common_preempt_count, common_pid */
	__u32 dev;       /* offset 8 */
	__u32 pad;
	__u64 sector;    /* offset 16 */
	__u64 third;     /* offset 24: nr_sector (u32) or, for block_split, new_sector (u64) */
};

/* The inflight id of a bio of `dev` ending before sector `end`: never 0. */
static __always_inline __u64 classic_id(__u32 dev, __u64 end)
{
	return end + 1 + ((__u64)dev << 44);
}

/* rwbs (blk_fill_rwbs): optional 'F' for a preflush, then the op: W write, D discard (DE secure
 * erase), R read, F flush, N anything else (write-zeroes, zone append, zone ops). */
static __always_inline int rwbs_changes_data(void *ctx, __u32 offset)
{
	char rwbs[2] = {};
	char op;

	bpf_probe_read_kernel(rwbs, sizeof(rwbs), (char *)ctx + offset);
	op = rwbs[0] == 'F' ? rwbs[1] : rwbs[0];
	return op == 'W' || op == 'D' || op == 'N';
}

SEC("tracepoint/block/block_bio_queue")
int tandem_queue_tp(struct tandem_tp_head *ctx)
{
	__u64 sector = ctx->sector;
	__u32 nr = (__u32)ctx->third, dev = ctx->dev;

	if (!tandem_watched(dev) || !rwbs_changes_data(ctx, consts.tp.bio_queue_rwbs))
		return 0;
	tandem_queue(dev, sector, (__u64)nr << 9, classic_id(dev, sector + nr), 0);
	return 0;
}

/* block_split: the split-off part is [sector, new_sector): one more write in flight. */
SEC("tracepoint/block/block_split")
int tandem_split_tp(struct tandem_tp_head *ctx)
{
	__u64 sector = ctx->sector, end = ctx->third;
	__u32 dev = ctx->dev;

	if (!tandem_watched(dev) || end <= sector || !rwbs_changes_data(ctx, consts.tp.split_rwbs))
		return 0;
	tandem_queue(dev, sector, (end - sector) << 9, classic_id(dev, end), 0);
	return 0;
}

struct back_walk {
	__u64 end;   /* end sector of the next bio to complete */
	__u64 start; /* the completion's first sector */
	__u32 dev;
	__u32 pad;
};

static long back_walk_step(__u64 index, void *arg)
{
	struct back_walk *w = arg;
	__u64 id = classic_id(w->dev, w->end);
	struct tandem_bio *slot, done;

	if (w->end <= w->start)
		return 1;
	slot = tandem_find(id);
	if (!slot || !tandem_release(slot, id, &done))
		return 1;
	tandem_account(&done, TANDEM_COMPLETED);
	if (done.sector >= w->end)
		return 1;
	w->end = done.sector;
	return 0;
}

static __always_inline void complete_span(__u32 dev, __u64 sector, __u32 nr)
{
	struct back_walk w = {};

	if (nr == 0 || !tandem_watched(dev))
		return;
	w.end = sector + nr;
	w.start = sector;
	w.dev = dev;
	bpf_loop(TANDEM_MAX_RQ_BIOS, back_walk_step, &w, 0);
}

SEC("tracepoint/block/block_rq_complete")
int tandem_rq_complete_tp(struct tandem_tp_head *ctx)
{
	if (!tandem_watched(ctx->dev) || !rwbs_changes_data(ctx, consts.tp.rq_complete_rwbs))
		return 0;
	complete_span(ctx->dev, ctx->sector, (__u32)ctx->third);
	return 0;
}

SEC("tracepoint/block/block_bio_complete")
int tandem_bio_complete_tp(struct tandem_tp_head *ctx)
{
	if (!tandem_watched(ctx->dev) || !rwbs_changes_data(ctx, consts.tp.bio_complete_rwbs))
		return 0;
	complete_span(ctx->dev, ctx->sector, (__u32)ctx->third);
	return 0;
}
