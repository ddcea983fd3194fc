/* Values both the C code and TypeScript use. The addon exports them
 * (constants.c, `constants`), and test/constants.test.ts fails if
 * TypeScript's declarations disagree with them. */
#ifndef WPSNAP_CONSTANTS_H
#define WPSNAP_CONSTANTS_H

/* How the engine reads a region (EngineRegion.kind). */
enum { KIND_ANON = 0, KIND_FILE = 1, KIND_PRIVATE = 2 };

/* Why the engine lists a page as lost; names as in snapshot-format/model.ts LOST_REASONS. */
enum {
  LOST_UNMAPPED = 0,
  LOST_DISCARDED = 1,
  LOST_READ_FAILED = 2,
  LOST_INTERRUPTED = 3,
  LOST_SHARED = 4,
  LOST_FILE_CHANGED = 5,
  LOST_TARGET_EXITED = 6,
  LOST_TARGET_EXEC = 7,
  LOST_VANISHED = 8,
  LOST_REASON_COUNT
};
extern const char *const lost_reason_names[LOST_REASON_COUNT];

/* Forced-failure points checked in C (core/fault.ts lists them all). */
#define FAULT_POINT_MID_INJECT "mid-inject"
/* The stager has written a batch to the spill file (kill -9 then). */
#define FAULT_POINT_MID_SPILL "mid-spill"
/* Once two batches are posted, a write fault's batch cannot be allocated (ENOMEM). */
#define FAULT_POINT_ENGINE_ALLOC "engine-alloc"
/* The sweep sees the first unsaved page of a chunk as gone from the page tables
 * (no data, no marker) with no event, as if the kernel had dropped it. */
#define FAULT_POINT_ENGINE_VANISH "engine-vanish"

#endif
