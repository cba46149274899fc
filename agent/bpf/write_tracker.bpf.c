// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * Tideline's kernel write tracker.
 *
 * Marks, in a per-disk bitmap, every chunk of a tracked whole disk that a
 * write-ish block operation touches (write, discard, secure erase, write
 * zeroes, zone append). The maps, the hooks and why each exists are
 * described in agent/src/tracking/writes/mod.rs; the bitmap layout is
 * specified in agent/src/tracking/writes/layout.rs (write_tracker.h holds
 * its numbers for this file).
 *
 * No vmlinux.h: the few kernel types read are declared below with only the
 * fields used, relocated at load time against the running kernel's BTF
 * (CO-RE, preserve_access_index). Fields that older kernels named or
 * placed differently have a ___old flavour, chosen with
 * bpf_core_field_exists.
 *
 * Dual-licensed because the kernel only lets GPL-compatible programs
 * attach to BTF tracepoints.
 */

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;

/* UAPI values from linux/bpf.h (stable kernel ABI). */
enum {
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_HASH_OF_MAPS = 13,
};
#define BPF_F_MMAPABLE (1U << 10)
#define BPF_F_INNER_MAP (1U << 12)

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "write_tracker.h"

typedef __u64 sector_t;
typedef __u32 blk_opf_t;
typedef __u8 blk_status_t;

/* include/linux/blk_types.h: enum req_op; REQ_OP_MASK is (1 << 8) - 1. */
#define REQ_OP_MASK 0xffU
#define REQ_OP_ZONE_RESET 17U
#define REQ_OP_ZONE_RESET_ALL 19U
#define REQ_OP_DRV_OUT 35U

/* include/linux/kdev_t.h: the kernel's dev_t is major << 20 | minor. */
#define TL_MINORBITS 20

struct request_queue;

struct gendisk {
	int major;
	int first_minor;
	struct request_queue *queue;
} __attribute__((preserve_access_index));

struct request_queue {
	struct gendisk *disk; /* since 5.15 */
	const void *mq_ops;   /* set for request-based (blk-mq) devices */
} __attribute__((preserve_access_index));

struct block_device {
	struct gendisk *bd_disk;
} __attribute__((preserve_access_index));

struct bvec_iter {
	sector_t bi_sector;
	unsigned int bi_size;
} __attribute__((preserve_access_index));

struct bio {
	struct block_device *bi_bdev; /* since 5.12 */
	blk_opf_t bi_opf;
	struct bvec_iter bi_iter;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	blk_opf_t cmd_flags;
	sector_t __sector;
} __attribute__((preserve_access_index));

/* Before 5.17 a request named its disk itself. */
struct request___old {
	struct gendisk *rq_disk;
} __attribute__((preserve_access_index));

/* Before 5.12 a bio named its disk, not its block device. */
struct bio___old {
	struct gendisk *bi_disk;
} __attribute__((preserve_access_index));

/*
 * One tracked disk's words. max_entries differs per disk: userspace creates
 * each inner map with its own size, which BPF_F_INNER_MAP allows.
 */
struct disk_words {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE | BPF_F_INNER_MAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
};

/* Whole disk dev_t (kernel encoding) -> that disk's words. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, TL_MAX_DISKS);
	__type(key, __u32);
	__array(values, struct disk_words);
} tl_disks SEC(".maps");

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * Arguments of BTF tracepoints are typed kernel pointers: fields are read
 * with plain loads (the verifier turns them into fault-safe loads), which
 * costs far less than bpf_probe_read_kernel. Only the fallbacks for older
 * layouts, dead code on current kernels, use BPF_CORE_READ.
 */
static __always_inline __u32 disk_key(struct gendisk *disk)
{
	return ((__u32)disk->major << TL_MINORBITS) | (__u32)disk->first_minor;
}

static __always_inline struct gendisk *request_disk(struct request *rq)
{
	if (bpf_core_field_exists(rq->q->disk))
		return rq->q->disk;
	return BPF_CORE_READ((struct request___old *)rq, rq_disk);
}

static __always_inline struct gendisk *bio_disk(struct bio *bio)
{
	if (bpf_core_field_exists(bio->bi_bdev))
		return bio->bi_bdev->bd_disk;
	return BPF_CORE_READ((struct bio___old *)bio, bi_disk);
}

/* Whether the disk is request-based (blk-mq): block_rq_complete marks it. */
static __always_inline int request_based(struct gendisk *disk)
{
	struct request_queue *q = disk->queue;

	return q && q->mq_ops;
}

static __always_inline void count(void *words, __u32 word)
{
	__u64 *p = bpf_map_lookup_elem(words, &word);

	if (p)
		__sync_fetch_and_add(p, 1);
}

static __always_inline int or_word(void *words, __u64 word, __u64 mask)
{
	__u32 index = TL_HEADER_WORDS + (__u32)word;
	__u64 *p = bpf_map_lookup_elem(words, &index);

	if (!p)
		return -1;
	__sync_fetch_and_or(p, mask);
	return 0;
}

/*
 * Sets the LIVE bits of every chunk that [sector, sector + bytes) touches.
 * Never drops silently: whatever cannot be set counts as an overflow.
 *
 * The first and last words take partial masks; the words between are set
 * whole by a loop the verifier walks once per iteration, so its bound
 * (TL_MAX_WORDS_PER_EVENT) is kept to what the verifier accepts.
 */
static __always_inline void mark(void *words, __u64 sector, __u32 bytes)
{
	__u32 k_shift = TL_HDR_SHIFT, k_chunks = TL_HDR_CHUNKS;
	__u64 *shift_p = bpf_map_lookup_elem(words, &k_shift);
	__u64 *chunks_p = bpf_map_lookup_elem(words, &k_chunks);
	__u64 shift, chunks, first, last, first_word, last_word, middle;
	__u64 first_mask, last_mask;
	__u32 i;

	if (!shift_p || !chunks_p) {
		count(words, TL_HDR_OVERFLOWS);
		return;
	}
	shift = *shift_p;
	chunks = *chunks_p;
	if (shift > TL_MAX_SHIFT || chunks == 0) {
		count(words, TL_HDR_OVERFLOWS);
		return;
	}
	first = sector >> shift;
	last = (sector + (((__u64)bytes + 511) >> 9) - 1) >> shift;
	if (last >= chunks) {
		/* Past the end the map was made for (the disk grew). */
		count(words, TL_HDR_OVERFLOWS);
		if (first >= chunks)
			return;
		last = chunks - 1;
	}
	first_word = first >> 6;
	last_word = last >> 6;
	if (last_word - first_word >= TL_MAX_WORDS_PER_EVENT) {
		count(words, TL_HDR_OVERFLOWS);
		return;
	}
	first_mask = ~0ULL << (first & 63);
	last_mask = ~0ULL >> (63 - (last & 63));
	if (first_word == last_word) {
		if (or_word(words, first_word, first_mask & last_mask))
			count(words, TL_HDR_OVERFLOWS);
		return;
	}
	if (or_word(words, first_word, first_mask) ||
	    or_word(words, last_word, last_mask)) {
		count(words, TL_HDR_OVERFLOWS);
		return;
	}
	/* Fewer than TL_MAX_WORDS_PER_EVENT (a power of two) by the check above. */
	middle = (last_word - first_word - 1) & (TL_MAX_WORDS_PER_EVENT - 1);
	for (i = 0; i < middle; i++) {
		if (or_word(words, first_word + 1 + i, ~0ULL)) {
			count(words, TL_HDR_OVERFLOWS);
			return;
		}
	}
}

/* Operations that write without a range the bitmap can name. */
static __always_inline int unpositioned(__u32 op)
{
	return op == REQ_OP_DRV_OUT || op == REQ_OP_ZONE_RESET ||
	       op == REQ_OP_ZONE_RESET_ALL;
}

/*
 * A request completed (fully or in part: nr_bytes from rq->__sector). The
 * authoritative hook for request-based devices: marking at completion
 * means a chunk that userspace cleared and then read can only have been
 * changed again by a write whose completion marks it again. A failed write
 * is marked too: part of it may have reached the medium.
 */
SEC("tp_btf/block_rq_complete")
int BPF_PROG(tl_rq_complete, struct request *rq, blk_status_t error,
	     unsigned int nr_bytes)
{
	__u32 op = rq->cmd_flags & REQ_OP_MASK;
	struct gendisk *disk;
	void *words;
	__u32 key;

	if (!(op & 1))
		return 0;
	disk = request_disk(rq);
	if (!disk)
		return 0;
	key = disk_key(disk);
	words = bpf_map_lookup_elem(&tl_disks, &key);
	if (!words)
		return 0;
	count(words, TL_HDR_WRITE_EVENTS);
	if (unpositioned(op)) {
		count(words, TL_HDR_OVERFLOWS);
		return 0;
	}
	if (nr_bytes == 0)
		return 0;
	mark(words, rq->__sector, nr_bytes);
	return 0;
}

/*
 * A bio entered the block layer (already remapped from its partition to
 * the whole disk). The only hook that sees bio-based devices (device
 * mapper, md), which have no requests; it marks and counts their writes.
 * Request-based disks are left to block_rq_complete at once: marking them
 * here too would only double the cost of every write.
 */
SEC("tp_btf/block_bio_queue")
int BPF_PROG(tl_bio_queue, struct bio *bio)
{
	__u32 op = bio->bi_opf & REQ_OP_MASK;
	struct gendisk *disk;
	__u32 size;
	void *words;
	__u32 key;

	if (!(op & 1))
		return 0;
	disk = bio_disk(bio);
	if (!disk || request_based(disk))
		return 0;
	key = disk_key(disk);
	words = bpf_map_lookup_elem(&tl_disks, &key);
	if (!words)
		return 0;
	count(words, TL_HDR_WRITE_EVENTS);
	if (unpositioned(op)) {
		count(words, TL_HDR_OVERFLOWS);
		return 0;
	}
	size = bio->bi_iter.bi_size;
	if (size == 0)
		return 0; /* an empty flush */
	mark(words, bio->bi_iter.bi_sector, size);
	return 0;
}

/*
 * A traced bio ended. For bio-based devices this is the completion-time
 * mark that block_rq_complete gives request-based ones; it can only mark
 * what the bio still describes. Request-based completions do not reach it
 * (blk_update_request clears the bio's BIO_TRACE_COMPLETION: rq_complete
 * traced them), and a bio advanced to size 0 is skipped.
 */
SEC("tp_btf/block_bio_complete")
int BPF_PROG(tl_bio_complete, struct request_queue *q, struct bio *bio)
{
	__u32 op = bio->bi_opf & REQ_OP_MASK;
	struct gendisk *disk;
	__u32 size;
	void *words;
	__u32 key;

	if (!(op & 1) || unpositioned(op))
		return 0;
	size = bio->bi_iter.bi_size;
	if (size == 0)
		return 0;
	disk = bio_disk(bio);
	if (!disk)
		return 0;
	key = disk_key(disk);
	words = bpf_map_lookup_elem(&tl_disks, &key);
	if (!words)
		return 0;
	mark(words, bio->bi_iter.bi_sector, size);
	return 0;
}
