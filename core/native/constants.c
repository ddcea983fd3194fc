/* The `constants` export: the values C and TypeScript share, from the C side.
 * TypeScript declares the same values where it needs them at compile time
 * (literal unions, feature bits); test/constants.test.ts fails if the two
 * disagree, so neither can drift alone. */
#include "addon.h"
#include "constants.h"
#include "kernel_compat.h"
#include "napi_util.h"

#include <linux/userfaultfd.h>
#include <sys/syscall.h>

#define PAGE_BYTES 4096

typedef struct {
  const char *name;
  uint64_t value;
} named_t;

static napi_value table(napi_env env, const named_t *entries, size_t n, bool as_bigint) {
  napi_value obj;
  if (napi_create_object(env, &obj) != napi_ok) return NULL;
  for (size_t i = 0; i < n; i++) set_prop(env, obj, entries[i].name, as_bigint ? make_bigint(env, entries[i].value) : make_int(env, (int64_t)entries[i].value));
  return obj;
}

static napi_value strings(napi_env env, const char *const *names, size_t n) {
  napi_value array;
  if (napi_create_array_with_length(env, n, &array) != napi_ok) return NULL;
  for (size_t i = 0; i < n; i++) napi_set_element(env, array, (uint32_t)i, make_string(env, names[i]));
  return array;
}

void register_constants_exports(napi_env env, napi_value exports) {
  static const named_t syscalls[] = {
      {"ioctl", SYS_ioctl},           {"close", SYS_close},         {"openat", SYS_openat},
      {"userfaultfd", __NR_userfaultfd}, {"pidfd_open", __NR_pidfd_open}, {"pidfd_getfd", __NR_pidfd_getfd},
      {"mmap", SYS_mmap},             {"mprotect", SYS_mprotect},   {"munmap", SYS_munmap},
      {"brk", SYS_brk},               {"mremap", SYS_mremap},       {"exit", SYS_exit},
      {"prctl", SYS_prctl},           {"set_tid_address", SYS_set_tid_address},
      {"set_robust_list", SYS_set_robust_list}, {"rseq", SYS_rseq},  {"rt_sigaction", SYS_rt_sigaction},
      {"setresuid", SYS_setresuid},   {"setresgid", SYS_setresgid}, {"setgroups", SYS_setgroups},
      {"memfd_create", SYS_memfd_create}, {"ftruncate", SYS_ftruncate}, {"clone3", SYS_clone3},
  };
  static const named_t features[] = {
      {"PAGEFAULT_FLAG_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP}, {"EVENT_FORK", UFFD_FEATURE_EVENT_FORK},
      {"EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP},             {"EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE},
      {"EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP},             {"THREAD_ID", UFFD_FEATURE_THREAD_ID},
      {"WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM}, {"WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED},
      {"WP_ASYNC", UFFD_FEATURE_WP_ASYNC},
  };
  static const named_t kinds[] = {{"anon", KIND_ANON}, {"file", KIND_FILE}, {"private", KIND_PRIVATE}};
  static const named_t ioctls[] = {{"UFFDIO_REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP}, {"USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW}};
  static const char *const fault_points[] = {FAULT_POINT_MID_INJECT, FAULT_POINT_MID_SPILL, FAULT_POINT_ENGINE_ALLOC, FAULT_POINT_ENGINE_VANISH};

  napi_value constants;
  if (napi_create_object(env, &constants) != napi_ok) return;
  set_prop(env, constants, "pageSize", make_int(env, PAGE_BYTES));
  set_prop(env, constants, "syscalls", table(env, syscalls, sizeof syscalls / sizeof syscalls[0], false));
  set_prop(env, constants, "uffdFeatures", table(env, features, sizeof features / sizeof features[0], true));
  set_prop(env, constants, "ioctls", table(env, ioctls, sizeof ioctls / sizeof ioctls[0], false));
  set_prop(env, constants, "regionKinds", table(env, kinds, sizeof kinds / sizeof kinds[0], false));
  set_prop(env, constants, "lostReasons", strings(env, lost_reason_names, LOST_REASON_COUNT));
  set_prop(env, constants, "faultPoints", strings(env, fault_points, sizeof fault_points / sizeof fault_points[0]));
  napi_object_freeze(env, constants);
  set_prop(env, exports, "constants", constants);
}
