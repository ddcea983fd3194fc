#include "engine_internal.h"

/* ---------- transparent huge pages ----------
 * UFFDIO_WRITEPROTECT keeps a huge PMD of an anonymous mapping huge only when
 * its range covers the whole 2 MiB (mm/mprotect.c change_pmd_range: a huge
 * pmd is split unless next - addr == HPAGE_PMD_SIZE; file-backed ones always
 * are); change_huge_pmd() then sets or clears the pmd's uffd-wp bit, and a
 * write fault on a protected huge pmd reaches us without a split
 * (wp_huge_pmd). The pause protects whole mappings, cut at 2 MiB boundaries
 * (uffd.c), so THPs are protected whole; a 4 KiB unprotect after a fault or a
 * 128 KiB sweep chunk would split them. So a PMD-mapped block is saved and
 * unprotected as one 2 MiB unit, by a fault in it or by the sweep. */

/* The first PMD-mapped block in [addr, end), as PAGEMAP_SCAN's PAGE_IS_HUGE
 * reports it (for anonymous memory only a huge pmd sets it); false if none. */
bool find_huge(engine_t *e, uint64_t addr, uint64_t end, struct wpsnap_page_region *r) { return pagemap_find_huge(e->pagemap_fd, addr, end, r); }

/* Is the 2 MiB block holding offset `off` of s one huge PMD now? Sets *block
 * to its offset in s; THP_ZERO when it maps the huge zero page. */
int thp_block(engine_t *e, segment_t *s, uint64_t off, uint64_t *block) {
  if (!s->may_thp) return THP_NONE;
  uint64_t addr = (s->cur_start + off) & ~(THP_BYTES - 1);
  struct wpsnap_page_region r;
  if (addr < s->cur_start || addr + THP_BYTES > s->cur_start + s->len) return THP_NONE;
  if (!find_huge(e, addr, addr + THP_BYTES, &r) || r.start != addr || r.end != addr + THP_BYTES) return THP_NONE;
  *block = addr - s->cur_start;
  return (r.categories & PAGE_IS_PFNZERO) ? THP_ZERO : THP_DATA;
}

/* need[i]: page i of the block is unsaved and holds data at T (every page of a
 * huge pmd does, but the huge zero page). Returns how many. */
uint32_t thp_need(segment_t *s, uint64_t block, int thp, uint8_t need[THP_PAGES]) {
  uint32_t n = 0;
  for (uint32_t i = 0; i < THP_PAGES; i++) {
    need[i] = thp == THP_DATA && s->state[block / PG + i] == PAGE_UNSAVED;
    n += need[i];
  }
  return n;
}

/* Copy the needed pages of the block, in runs, to dst. 0 or an errno. */
int thp_copy(engine_t *e, segment_t *s, uint64_t block, const uint8_t need[THP_PAGES], uint8_t *dst) {
  uint32_t k = 0;
  for (uint32_t i = 0; i < THP_PAGES;) {
    if (!need[i]) {
      i++;
      continue;
    }
    uint32_t j = i;
    while (j < THP_PAGES && need[j]) j++;
    int err = seg_copy(e, s, block + (uint64_t)i * PG, (uint64_t)(j - i) * PG, dst + (size_t)k * PG);
    if (err != 0) return err;
    k += j - i;
    i = j;
  }
  return 0;
}

/* The block is unprotected: its copied pages go into *batch (reserved by
 * thp_need's count), and every other unsaved page of it was zero at T. */
void thp_commit(engine_t *e, segment_t *s, uint64_t block, const uint8_t need[THP_PAGES], slot_t **batch) {
  uint32_t k = 0;
  for (uint32_t i = 0; i < THP_PAGES; i++) {
    uint8_t *state = &s->state[block / PG + i];
    if (need[i]) (*batch)->addrs[(*batch)->count + k++] = s->t_start + block + (uint64_t)i * PG;
    else if (*state == PAGE_UNSAVED) count_zero(e, ZERO_HUGE_ZERO_PAGE, 1);
    if (*state == PAGE_UNSAVED) *state = PAGE_SAVED;
  }
  if (k == 0) return;
  (*batch)->count += k;
  atomic_fetch_add(&e->bytes_copied, (uint64_t)k * PG);
  if ((*batch)->count == (*batch)->cap) flush_batch(e, batch);
}

/* Save and unprotect a PMD-mapped block, for a fault (which may not wait for
 * the pool) or the sweep. Returns 0 when done; EAGAIN when events were applied
 * (segments may have moved: look the address up again); ENOBUFS when the
 * sweep has no batch; -1 when a page could not be read (use 4 KiB units). */
int save_thp(engine_t *e, segment_t *s, uint64_t block, int thp, bool from_fault) {
  uint8_t need[THP_PAGES];
  uint32_t n = thp_need(s, block, thp, need);
  uint8_t *dst = n > 0 ? reserve(e, n, from_fault) : NULL;
  if (n > 0 && dst == NULL) return ENOBUFS;
  step_t st = copy_outcome(e, n > 0 ? thp_copy(e, s, block, need, dst) : 0, true);
  if (st == STEP_OK) st = unprotect_outcome(e, from_fault ? unprotect_checked(e, s->cur_start + block, THP_BYTES) : settle_checked(e, s->cur_start + block, THP_BYTES), "ioctl(UFFDIO_WRITEPROTECT) of a huge page");
  if (st == STEP_RETRY) return EAGAIN;
  if (st == STEP_STOP) return 0;
  if (st != STEP_OK) return -1; /* unreadable or unregistered: 4 KiB units decide page by page */
  thp_commit(e, s, block, need, from_fault ? &e->cur_fault : &e->cur_sweep);
  atomic_fetch_add(from_fault ? &e->pages_fault : &e->pages_sweep, n);
  return 0;
}

/* Which segments may hold THPs: anonymous ones with a huge pmd at the start.
 * Later huge pmds only form where every pte is unprotected (khugepaged and
 * MADV_COLLAPSE refuse uffd-wp ptes), i.e. over saved pages. */
void find_thp_segments(engine_t *e) {
  struct wpsnap_page_region r;
  for (size_t i = 0; i < e->nsegs; i++) {
    segment_t *s = &e->segs[i];
    s->may_thp = s->kind == KIND_ANON && !s->hugetlb && s->len >= THP_BYTES &&
                 find_huge(e, s->cur_start, s->cur_start + s->len, &r);
  }
}
