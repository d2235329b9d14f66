/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The layout of Tandem's pinned BPF maps, shared by the programs in this directory and by the
 * Rust crate `tandem-bpf` (userspace/bpf/src/layout.rs), which mirrors every struct below with a
 * #[repr(C)] struct and checks, in its tests, each size and field offset against the BTF that
 * clang emits for these structs. Change both sides together and bump TANDEM_LAYOUT_VERSION.
 *
 * One loaded instance of the programs per volume, each with its own maps, pinned under
 * /sys/fs/bpf/tandem/<volume>/:
 *
 *   params    ARRAY[1] of struct tandem_params     geometry of the volume (read by the programs)
 *   devices   HASH dev -> __u32 slot               the watched device(s), kernel dev_t encoding (for
 *             userspace: the programs test the same devices in their constants, tandem_consts)
 *   bitmap    ARRAY of __u64, BPF_F_MMAPABLE       per range, two sides of tracks_per_range bits
 *   ranges    ARRAY of struct tandem_range, BPF_F_MMAPABLE   per-range toggle state + counters
 *   counters  ARRAY of __u64, BPF_F_MMAPABLE    per CPU, per range, per side: write bios queued and
 *             completed (monotonic; in flight on a side = sum over CPUs of queued - completed)
 *   inflight  ARRAY of struct tandem_bio, BPF_F_MMAPABLE    write bios queued, not yet complete:
 *             an open-addressing table claimed with cmpxchg (no locks: a hash map's bucket lock
 *             makes a delete fail with -EBUSY when a completion interrupts a queue program on
 *             the same CPU, which would leave a write counted in flight forever)
 *   link_queue, link_split, link_rq_complete, link_bio_complete   the attached programs (links)
 *   reap      (tp_btf only) a program userspace runs (BPF_PROG_TEST_RUN) to release slots whose
 *             bio is provably no longer in flight: completions the programs did not see
 *
 * bitmap word of (range r, side s, word w) is at index (r * 2 + s) * words_per_range + w;
 * bit b of that word is track r * tracks_per_range + w * 64 + b. Bits past the range's last
 * track (or the volume's last track) stay zero.
 *
 * counters of (cpu c, range r) are at c * counters_per_cpu + r * 4 + k, k = TANDEM_QUEUED + side
 * or TANDEM_COMPLETED + side. Per CPU so that no cache line bounces between the CPU that queues
 * a write and the one that completes it; userspace sums completed first, then queued.
 */
#ifndef TANDEM_H
#define TANDEM_H

#define TANDEM_MAGIC 0x4d444e54u /* "TNDM" read as a little-endian __u32 */
#define TANDEM_LAYOUT_VERSION 2u

#define TANDEM_MAX_DEVICES 16
#define TANDEM_INFLIGHT_BITS 14
#define TANDEM_INFLIGHT_SLOTS (1u << TANDEM_INFLIGHT_BITS) /* 16384 */
#define TANDEM_INFLIGHT_PROBES 8 /* slots tried from a key's home slot */
#define TANDEM_WORD_BITS 64

/* tandem_params.flavor: which programs record the writes */
#define TANDEM_FLAVOR_TP_BTF 1u  /* tp_btf/block_bio_queue + tp_btf/block_bio_complete */
#define TANDEM_FLAVOR_CLASSIC 2u /* tracepoint/block/block_bio_queue + .../block_bio_complete */

/* tandem_bio.key of a slot being claimed: its fields still describe its previous bio */
#define TANDEM_KEY_FILLING 0xffffffffffffffffu

/* tandem_bio.side: a bio spanning several ranges is counted on both sides of each */
#define TANDEM_SIDE_BOTH 2u

/* counters: offsets within a range's 4 counters */
#define TANDEM_QUEUED 0u
#define TANDEM_COMPLETED 2u

struct tandem_params {
	__u32 magic;            /* TANDEM_MAGIC */
	__u32 version;          /* TANDEM_LAYOUT_VERSION */
	__u32 dev;              /* the volume's device, kernel encoding major << 20 | minor (for a
	                           partition, `devices` also holds the whole disk's) */
	__u32 track_shift;      /* log2 of the track size in bytes */
	__u64 start_sector;     /* first 512-byte sector of the volume on the disk (a partition's
	                           start: bios carry absolute sectors), else 0 */
	__u64 nr_sectors;       /* volume size in 512-byte sectors */
	__u64 tracks;           /* tracks in the volume */
	__u32 tracks_per_range; /* tracks per range (the last range may be shorter) */
	__u32 words_per_range;  /* ceil(tracks_per_range / 64): words per side of a range */
	__u32 ranges;           /* ranges in the volume */
	__u32 flavor;           /* TANDEM_FLAVOR_* */
	__u64 generation;       /* the volume's generation, set by userspace, unused by the programs */
	__u32 cpus;             /* possible CPUs: the counters map holds cpus * counters_per_cpu */
	__u32 counters_per_cpu; /* ranges * 4 rounded up to 8 (a whole number of cache lines) */
	__u64 diskseq;          /* the disk's sequence number (struct gendisk.diskseq, Linux >= 5.15;
	                           for a partition, the whole disk's) when the programs were loaded:
	                           with dev, the device's identity, since a dev_t is reused by the
	                           next device that gets the number and a diskseq never is (per boot).
	                           The tp_btf queue programs record only bios of this diskseq; 0: the
	                           kernel has none, the programs go by dev alone (as the classic
	                           flavour always does: its events carry no disk) */
};

struct tandem_range {
	__u32 current;     /* side (0 or 1) new marks go to; written by userspace only (toggle) */
	__u32 toggles;     /* toggles of this range since the maps were created (userspace) */
	__u64 marked[2];   /* write bios that set new bits on each side since it was last cleared */
	__u64 untracked;   /* write bios whose completion could not be tracked (no free slot near
	                      their home slot, or, classic only, another write in flight with the
	                      same key): marked on both sides, never counted in flight */
};

/*
 * One slot of the inflight table. key 0: free. A queue program claims a free slot among
 * TANDEM_INFLIGHT_PROBES from the key's home slot with cmpxchg(key, 0, TANDEM_KEY_FILLING),
 * fills it, then publishes it with cmpxchg(key, TANDEM_KEY_FILLING, id); the completion finds
 * it by key, copies it and releases it with cmpxchg(key, id, 0) — whoever wins that cmpxchg
 * releases the counts. tp_btf: id is the bio's address. classic: id is
 * (end sector + 1) + (dev << 44), the only identity the classic events share.
 * Home slot h: (id * 0x9e3779b97f4a7c15) >> (64 - TANDEM_INFLIGHT_BITS); probe k (0..7) is slot
 * (h & ~3) + (k / 2) * 4 + (k % 2) * 3: only slots 4n and 4n + 3, which lie within one cache
 * line each (the array is page-aligned).
 */
struct tandem_bio {
	__u64 key;
	__u32 first_range; /* ranges the bio touches, first..last inclusive */
	__u32 last_range;
	__u32 side;        /* side it was counted and marked on (0 or 1), or TANDEM_SIDE_BOTH */
	__u32 dev;         /* device it was queued on */
	__u64 queued_ns;   /* CLOCK_MONOTONIC at queue time, to a tick (read once per jiffy) */
	__u64 sector;      /* first sector of the bio (the classic completion walk uses it) */
	__u32 bytes;       /* its size */
	__u32 pad;
};

/*
 * Classic flavour only: offsets of the rwbs string in the classic tracepoints' records, which
 * moved between kernels (block_rq_complete gained ioprio in 6.x). The loader reads them from
 * /sys/kernel/tracing/events/block/<event>/format. dev, sector and nr_sector (new_sector for
 * block_split) are at offsets 8, 16 and 24 in all four events (checked too).
 */
struct tandem_tp_layout {
	__u32 bio_queue_rwbs;
	__u32 split_rwbs;
	__u32 rq_complete_rwbs;
	__u32 bio_complete_rwbs;
};

/* tandem_consts.range_shift when tracks_per_range is not a power of two */
#define TANDEM_NO_SHIFT 0xffu

/*
 * Not a map of the pinned layout: each object's .rodata (`const volatile struct tandem_consts
 * consts`), which the loader fills from the volume's geometry before loading. libbpf freezes
 * .rodata, so the verifier reads these as constants: the device filter becomes two compares
 * with immediates (no `devices` lookup for the bios of every other device), the geometry needs
 * no `params` lookup, and the branches they decide (power-of-two range, a second device) are
 * removed at load. `params` and `devices` keep the same values for userspace and bpftool.
 */
struct tandem_consts {
	__u64 start_sector;     /* = params.start_sector */
	__u64 nr_sectors;       /* = params.nr_sectors */
	__u64 tracks;           /* = params.tracks */
	__u64 diskseq;          /* = params.diskseq (tp_btf only: the classic programs ignore it) */
	__u32 devs[2];          /* the watched devices (the keys of `devices`); 0: none */
	__u32 track_shift;      /* = params.track_shift */
	__u32 tracks_per_range; /* = params.tracks_per_range */
	__u32 range_shift;      /* log2(tracks_per_range) if a power of two, else TANDEM_NO_SHIFT */
	__u32 words_per_range;  /* = params.words_per_range */
	__u32 cpus;             /* = params.cpus */
	__u32 counters_per_cpu; /* = params.counters_per_cpu */
	struct tandem_tp_layout tp; /* classic flavour only; zero in the tp_btf object */
};

#endif /* TANDEM_H */
