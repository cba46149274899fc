/* SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause */
/*
 * Layout of a tracked disk's word map, as the BPF program sees it.
 *
 * The specification is the Rust side, agent/src/tracking/writes/layout.rs;
 * these numbers must match it (a unit test there reads this file and
 * compares every TL_ define with the Rust constant of the same meaning).
 *
 * A tracked whole disk has one BPF_MAP_TYPE_ARRAY of u64 words:
 *
 *   [0, TL_HEADER_WORDS)                  header (userspace writes it before
 *                                         the map is reachable from the
 *                                         program; BPF only reads SHIFT and
 *                                         CHUNKS and increments counters)
 *   [TL_HEADER_WORDS, +live_words)        LIVE bitmap, bit c = chunk c written
 *   [.. , +live_words)                    PENDING bitmap (userspace only)
 *
 * live_words = ceil(CHUNKS / 64); chunk c covers the whole disk's bytes
 * [c << (SHIFT + 9), (c + 1) << (SHIFT + 9)).
 */
#ifndef TIDELINE_WRITE_TRACKER_H
#define TIDELINE_WRITE_TRACKER_H

/* Header words. */
#define TL_HDR_MAGIC 0
#define TL_HDR_VERSION 1
#define TL_HDR_MAP_ID 2
#define TL_HDR_SHIFT 3
#define TL_HDR_CHUNKS 4
#define TL_HDR_DISKSEQ 5
#define TL_HDR_WRITE_EVENTS 6
#define TL_HDR_OVERFLOWS 7
#define TL_HDR_GAPS 8
#define TL_HDR_DISK_SECTORS 9
#define TL_HDR_CAUSE 10

/* First word of the LIVE bitmap. */
#define TL_HEADER_WORDS 256

/* Largest SHIFT the program accepts (chunks of 512 << 22 = 2 GiB). */
#define TL_MAX_SHIFT 22

/*
 * Bitmap words one event may set. Past this (a discard of more than
 * TL_MAX_WORDS_PER_EVENT * 64 chunks), the event counts as an overflow
 * and sets no bit: the agent must fall back to a hash scan.
 */
#define TL_MAX_WORDS_PER_EVENT 2048

/* Whole disks the outer map can hold. */
#define TL_MAX_DISKS 1024

#endif
