/* The store's own small addon (wpsnap_pagehash): the zero-page test and the
 * content hash of 4 KiB pages for its worker threads, one call per batch
 * instead of one crypto call per page. It is separate from the controller's
 * addon so that the store loads no ptrace or userfaultfd code.
 *
 * SHA-256 comes from the OpenSSL built into the node binary, which exports
 * its symbols to addons (the same code node:crypto runs, with the CPU's SHA
 * extensions where present). The store keeps the first HASH_BYTES of it. */
#include <node_api.h>
#include <errno.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define HASH_BYTES 16
#define SHA256_BYTES 32

/* OpenSSL's one-shot digest (openssl/sha.h), resolved against the node binary. */
extern unsigned char *SHA256(const unsigned char *data, size_t len, unsigned char *md);

static bool page_is_zero(const unsigned char *page) {
  const uint64_t *w = (const uint64_t *)page;
  for (size_t i = 0; i < PAGE / 8; i += 8) {
    if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) != 0) return false;
  }
  return true;
}

/* The bytes of a Buffer or any TypedArray. */
static bool byte_view(napi_env env, napi_value v, void **data, size_t *len) {
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed) return false;
  napi_typedarray_type type;
  size_t length, offset;
  napi_value arraybuffer;
  if (napi_get_typedarray_info(env, v, &type, &length, data, &arraybuffer, &offset) != napi_ok) return false;
  if (type != napi_uint8_array && type != napi_uint8_clamped_array && type != napi_int8_array) return false;
  *len = length;
  return true;
}

static napi_value type_error(napi_env env, const char *message) {
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", message);
  return NULL;
}

/* scanPages(data, zero | null, hashes): for each page of data, zero[i] = 1 if
 * it is all zero bytes (its hash left unset), else hashes[i*16 ..] = its
 * SHA-256/128. With zero = null every page is hashed. */
static napi_value js_scan_pages(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  void *data, *zero = NULL, *hashes;
  size_t data_len, zero_len = 0, hashes_len;
  napi_valuetype zero_type = napi_null;
  if (argc >= 2) napi_typeof(env, argv[1], &zero_type);
  if (argc < 3 || !byte_view(env, argv[0], &data, &data_len) ||
      (zero_type != napi_null && !byte_view(env, argv[1], &zero, &zero_len)) ||
      !byte_view(env, argv[2], &hashes, &hashes_len))
    return type_error(env, "scanPages(data: Uint8Array, zero: Uint8Array | null, hashes: Uint8Array)");
  size_t pages = data_len / PAGE;
  if (data_len % PAGE != 0 || hashes_len < pages * HASH_BYTES || (zero != NULL && zero_len < pages))
    return type_error(env, "scanPages: data must be whole pages, zero one byte and hashes 16 bytes per page");
  unsigned char digest[SHA256_BYTES];
  for (size_t i = 0; i < pages; i++) {
    const unsigned char *page = (const unsigned char *)data + i * PAGE;
    if (zero != NULL) {
      bool is_zero = page_is_zero(page);
      ((unsigned char *)zero)[i] = is_zero;
      if (is_zero) continue;
    }
    SHA256(page, PAGE, digest);
    memcpy((unsigned char *)hashes + i * HASH_BYTES, digest, HASH_BYTES);
  }
  return NULL;
}

/* setThreadPriority(mode): the calling thread's scheduling. 'idle': SCHED_IDLE
 * (runs only when no normal thread wants the CPU); 'nice': SCHED_OTHER at nice
 * 19 (a small share against busy threads); 'normal': SCHED_OTHER at nice 0.
 * Returns 0 or the errno (without the privilege to go back up, the thread
 * stays where it is). Linux applies both per thread. */
static napi_value js_set_thread_priority(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  char mode[16] = "";
  size_t len;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return NULL;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], mode, sizeof mode, &len) != napi_ok)
    return type_error(env, "setThreadPriority(mode: 'idle' | 'nice' | 'normal')");
  struct sched_param none = {0};
  int policy = strcmp(mode, "idle") == 0 ? SCHED_IDLE : SCHED_OTHER;
  int nice = strcmp(mode, "nice") == 0 ? 19 : 0;
  if (strcmp(mode, "idle") != 0 && strcmp(mode, "nice") != 0 && strcmp(mode, "normal") != 0)
    return type_error(env, "setThreadPriority(mode: 'idle' | 'nice' | 'normal')");
  int err = 0;
  if (sched_setscheduler(0, policy, &none) != 0) err = errno;
  if (err == 0 && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice) != 0) err = errno;
  napi_value result;
  napi_create_int32(env, err, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn, size;
  if (napi_create_function(env, "setThreadPriority", NAPI_AUTO_LENGTH, js_set_thread_priority, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "setThreadPriority", fn) != napi_ok) return NULL;
  if (napi_create_function(env, "scanPages", NAPI_AUTO_LENGTH, js_scan_pages, NULL, &fn) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "scanPages", fn) != napi_ok) return NULL;
  /* The hash length the C code writes, so TypeScript need not write it twice. */
  if (napi_create_uint32(env, HASH_BYTES, &size) != napi_ok) return NULL;
  if (napi_set_named_property(env, exports, "HASH_BYTES", size) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
