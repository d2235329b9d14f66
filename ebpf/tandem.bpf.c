// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Tandem's write recording, preferred flavour: BTF-enabled raw tracepoints (tp_btf), read with
 * CO-RE. Needs kernel BTF (/sys/kernel/btf/vmlinux) and bpf_loop (Linux >= 5.17).
 * The maps and the marking logic are in tandem_common.bpf.h; the layout in tandem.h.
 *
 * Completions: request-based drivers (loop, ublk, nvme, scsi, virtio) complete requests, and
 * the block layer traces block_rq_complete instead of block_bio_complete for their bios; the
 * program walks the request's bios. Bio-based drivers (dm, md, brd, zram) trace
 * block_bio_complete per bio.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "tandem_common.bpf.h"

/* Linux < 6.0 named the enum of REQ_OP_* values `enum req_opf`. */
enum req_opf___old {
	REQ_OP_WRITE___old = 1,
	REQ_OP_DISCARD___old = 3,
	REQ_OP_SECURE_ERASE___old = 5,
	REQ_OP_WRITE_ZEROES___old = 9,
	REQ_OP_ZONE_APPEND___old = 13,
};

#define TANDEM_REQ_OP_MASK 0xffu /* (1 << REQ_OP_BITS) - 1, REQ_OP_BITS = 8 since 4.10 */
#define TANDEM_MAX_RQ_BIOS 4096u

#define OP_VALUE(name)                                                                   \
	(bpf_core_enum_value_exists(enum req_op, name) ? bpf_core_enum_value(enum req_op, name) \
						       : bpf_core_enum_value(enum req_opf___old, name##___old))

/* Writes, discards, secure erases, write-zeroes and zone appends change data; reads, flushes
 * and zone management ops do not mark (an empty flush has no size anyway). */
static __always_inline int op_changes_data(__u32 op)
{
	op &= TANDEM_REQ_OP_MASK;
	return op == OP_VALUE(REQ_OP_WRITE) || op == OP_VALUE(REQ_OP_DISCARD) ||
	       op == OP_VALUE(REQ_OP_SECURE_ERASE) || op == OP_VALUE(REQ_OP_WRITE_ZEROES) ||
	       op == OP_VALUE(REQ_OP_ZONE_APPEND);
}

/*
 * A bio's address as a plain number (the inflight table hashes it). The verifier allows no
 * arithmetic on a BTF pointer but the difference of two pointers, which it makes a scalar (for
 * programs that may read kernel pointers, as tracing programs may): the bio's distance from a
 * global of ours, plus that global's address, which the first run reads once (a helper call
 * per bio was a measurable part of the programs' cost).
 */
static __u64 anchor_addr;

static __always_inline __u64 bio_id(struct bio *bio)
{
	__u64 base = anchor_addr, id;

	if (!base) {
		void *anchor = &anchor_addr;

		bpf_probe_read_kernel(&base, sizeof(base), &anchor);
		anchor_addr = base;
	}
	id = (__u64)((long)bio - (long)&anchor_addr);
	/* keep clang from folding the sum into pointer + scalar, which the verifier refuses */
	asm volatile("" : "+r"(id));
	return id + base;
}

/*
 * A bio of our device number is on our disk only if the disk is the one the loader saw: the
 * programs outlive the daemon, and when its loop device goes away the kernel hands the same
 * minor (the same dev_t) to the next losetup, an unrelated device. The disk's diskseq (Linux
 * >= 5.15, a per-boot counter the kernel never reuses; a loop device's re-attach advances it)
 * tells them apart. A partition's bio points at the whole disk, whose diskseq the loader took.
 * Only the queue side checks: a bio not counted at queue holds no inflight slot, so its
 * completion (found by the bio's address) releases nothing. Without diskseq in the kernel
 * (consts.diskseq 0, or no such field) the device number alone decides.
 */
static __always_inline int same_disk(struct bio *bio)
{
	struct gendisk *disk;

	if (!consts.diskseq)
		return 1;
	disk = bio->bi_bdev->bd_disk;
	if (!bpf_core_field_exists(disk->diskseq))
		return 1;
	return disk->diskseq == consts.diskseq;
}

/* Cheapest test first: most bios on a machine belong to other devices. */
static __always_inline void queue_bio(struct bio *bio)
{
	__u32 dev = bio->bi_bdev->bd_dev;

	if (!tandem_watched(dev) || !same_disk(bio) || !op_changes_data(bio->bi_opf))
		return;
	tandem_queue(dev, bio->bi_iter.bi_sector, bio->bi_iter.bi_size, bio_id(bio), 1);
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(tandem_queue_btf, struct bio *bio)
{
	queue_bio(bio);
	return 0;
}

/* The split-off front part of a bio: one more write in flight (see tandem_common.bpf.h). */
SEC("tp_btf/block_split")
int BPF_PROG(tandem_split_btf, struct bio *split, unsigned int new_sector)
{
	queue_bio(split);
	return 0;
}

struct rq_walk {
	__u64 bio;  /* next bio of the request (kernel address) */
	__u32 left; /* bytes of the completion not yet attributed to a bio */
	__u32 pad;
};

static long rq_walk_step(__u64 index, void *arg)
{
	struct rq_walk *w = arg;
	struct bio *bio = (struct bio *)(unsigned long)w->bio;
	__u32 size;

	if (!bio)
		return 1;
	size = BPF_CORE_READ(bio, bi_iter.bi_size);
	if (size > w->left)
		return 1; /* partially completed: it stays in the request */
	w->left -= size;
	tandem_complete(w->bio);
	w->bio = (__u64)(unsigned long)BPF_CORE_READ(bio, bi_next);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(tandem_rq_complete_btf, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct bio *bio = rq->bio, *next;
	struct rq_walk w = {};
	__u32 dev, size;

	if (!bio)
		return 0;
	dev = bio->bi_bdev->bd_dev;
	if (!tandem_watched(dev) || !op_changes_data(rq->cmd_flags))
		return 0;
	/* the first bio inline: most requests have one */
	size = bio->bi_iter.bi_size;
	if (size > nr_bytes)
		return 0; /* partially completed: it stays in the request */
	tandem_complete(bio_id(bio));
	next = bio->bi_next;
	if (!next)
		return 0;
	w.bio = bio_id(next);
	w.left = nr_bytes - size;
	bpf_loop(TANDEM_MAX_RQ_BIOS, rq_walk_step, &w, 0);
	return 0;
}

SEC("tp_btf/block_bio_complete")
int BPF_PROG(tandem_bio_complete_btf, struct request_queue *q, struct bio *bio)
{
	/*
	 * No device filter: a bio-based driver may have remapped the bio in place to another
	 * device (md's bio_set_dev) before it completes. Plain reads first, so that the bios of
	 * devices we do not watch take no cache line away from the slots in use.
	 */
	struct tandem_bio *slot, done;
	__u64 id = bio_id(bio);

	slot = tandem_find(id);
	if (slot && tandem_release(slot, id, &done))
		tandem_account(&done, TANDEM_COMPLETED);
	return 0;
}

/*
 * Not attached: userspace runs it (BPF_PROG_TEST_RUN) while a drain waits, to release the slots
 * of bios that are provably no longer in flight, i.e. whose completion the programs did not see
 * (on Linux 6.18 a small fraction of loop requests complete without our block_rq_complete
 * program running for them). A bio still in flight keeps its end sector and a non-zero size (the
 * block layer only advances it, at completion or when splitting off its front); a completed bio
 * has size 0, a freed and reused one describes other sectors. Returns how many it released.
 */
struct reap_ctx {
	__u32 released;
	__u32 pad;
};

static long reap_step(__u64 index, void *arg)
{
	struct reap_ctx *r = arg;
	__u32 idx = (__u32)index;
	struct tandem_bio *slot = bpf_map_lookup_elem(&inflight, &idx);
	struct tandem_bio seen;
	struct bio *bio;
	__u64 sector, end, cur_end;
	__u32 size;

	if (!slot)
		return 1;
	seen = *slot;
	if (!seen.key || seen.key == TANDEM_KEY_FILLING)
		return 0; /* free, or being claimed: its fields are not its bio's yet */
	bio = (struct bio *)(unsigned long)seen.key;
	sector = BPF_CORE_READ(bio, bi_iter.bi_sector);
	size = BPF_CORE_READ(bio, bi_iter.bi_size);
	end = seen.sector + (((__u64)seen.bytes + 511) >> 9);
	cur_end = sector + (((__u64)size + 511) >> 9);
	if (size > 0 && cur_end == end && sector >= seen.sector)
		return 0; /* still in flight (or reused for the very same sectors: keep it) */
	if (tandem_release(slot, seen.key, &seen)) {
		tandem_account(&seen, TANDEM_COMPLETED);
		r->released++;
	}
	return 0;
}

SEC("raw_tp")
int tandem_reap(void *ctx)
{
	struct reap_ctx r = {};

	bpf_loop(TANDEM_INFLIGHT_SLOTS, reap_step, &r, 0);
	return r.released;
}
