/* Zero-page test and content hash of 4 KiB pages, for the store's worker
 * threads: one call per batch instead of one crypto call per page.
 *
 * SHA-256 comes from the OpenSSL built into the node binary, which exports
 * its symbols to addons (the same code node:crypto runs, with the CPU's SHA
 * extensions where present). The store keeps the first HASH_BYTES of it. */
#include "addon.h"
#include "napi_util.h"

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

/* scanPages(data, zero | null, hashes): for each page of data, zero[i] = 1 if
 * it is all zero bytes (its hash left unset), else hashes[i*16 ..] = its
 * SHA-256/128. With zero = null every page is hashed. */
static napi_value js_scan_pages(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *data, *zero = NULL, *hashes;
  size_t data_len, zero_len = 0, hashes_len;
  napi_valuetype zero_type = napi_null;
  if (argc >= 2) napi_typeof(env, argv[1], &zero_type);
  if (argc < 3 || !arg_buffer(env, argv[0], &data, &data_len) ||
      (zero_type != napi_null && !arg_buffer(env, argv[1], &zero, &zero_len)) ||
      !arg_buffer(env, argv[2], &hashes, &hashes_len))
    return throw_type(env, "scanPages(data, zero | null, hashes)");
  size_t pages = data_len / PAGE;
  if (data_len % PAGE != 0 || hashes_len < pages * HASH_BYTES || (zero != NULL && zero_len < pages))
    return throw_type(env, "scanPages: data must be whole pages, zero one byte and hashes 16 bytes per page");
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

void register_pagehash_exports(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"scanPages", NULL, js_scan_pages, NULL, NULL, NULL, napi_default_jsproperty, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
}
