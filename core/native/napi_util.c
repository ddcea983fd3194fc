#include "napi_util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *errno_name(int err) {
  static __thread char unknown[32];
  const char *name = strerrorname_np(err);
  if (name != NULL) return name;
  snprintf(unknown, sizeof unknown, "UNKNOWN_ERRNO_%d", err);
  return unknown;
}

napi_value throw_errno(napi_env env, int err, const char *syscall, const char *fmt, ...) {
  char what[384];
  char message[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  snprintf(message, sizeof message, "%s: %s (%s)", what, errno_name(err), strerror(err));

  napi_value msg, code, error;
  if (napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code) != napi_ok) return NULL;
  if (napi_create_error(env, code, msg, &error) != napi_ok) return NULL;
  set_prop(env, error, "errno", make_int(env, err));
  set_prop(env, error, "syscall", make_string(env, syscall));
  napi_throw(env, error);
  return NULL;
}

napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, "EINVALIDARG", message);
  return NULL;
}

bool arg_int32(napi_env env, napi_value v, int32_t *out) {
  return napi_get_value_int32(env, v, out) == napi_ok;
}

bool arg_uint64(napi_env env, napi_value v, uint64_t *out) {
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok) return false;
  if (type == napi_bigint) {
    bool lossless;
    return napi_get_value_bigint_uint64(env, v, out, &lossless) == napi_ok && lossless;
  }
  if (type == napi_number) {
    double d;
    if (napi_get_value_double(env, v, &d) != napi_ok || d < 0 || d > 9007199254740991.0) return false;
    *out = (uint64_t)d;
    return true;
  }
  return false;
}

bool arg_bool(napi_env env, napi_value v, bool *out) {
  return napi_get_value_bool(env, v, out) == napi_ok;
}

bool arg_buffer(napi_env env, napi_value v, void **data, size_t *len) {
  bool is_buffer = false;
  if (napi_is_buffer(env, v, &is_buffer) == napi_ok && is_buffer)
    return napi_get_buffer_info(env, v, data, len) == napi_ok;
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) == napi_ok && is_typed) {
    napi_typedarray_type type;
    size_t length, offset;
    napi_value ab;
    void *base;
    if (napi_get_typedarray_info(env, v, &type, &length, &base, &ab, &offset) != napi_ok) return false;
    size_t elem = (type == napi_bigint64_array || type == napi_biguint64_array || type == napi_float64_array) ? 8
                : (type == napi_int32_array || type == napi_uint32_array || type == napi_float32_array) ? 4
                : (type == napi_int16_array || type == napi_uint16_array) ? 2 : 1;
    *data = base;
    *len = length * elem;
    return true;
  }
  return false;
}

bool prop_uint64(napi_env env, napi_value obj, const char *name, uint64_t *out) {
  napi_value v;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return false;
  return arg_uint64(env, v, out);
}

bool prop_int32(napi_env env, napi_value obj, const char *name, int32_t *out) {
  napi_value v;
  if (napi_get_named_property(env, obj, name, &v) != napi_ok) return false;
  return arg_int32(env, v, out);
}

napi_value make_bigint(napi_env env, uint64_t v) {
  napi_value out = NULL;
  napi_create_bigint_uint64(env, v, &out);
  return out;
}

napi_value make_int(napi_env env, int64_t v) {
  napi_value out = NULL;
  napi_create_int64(env, v, &out);
  return out;
}

napi_value make_double(napi_env env, double v) {
  napi_value out = NULL;
  napi_create_double(env, v, &out);
  return out;
}

napi_value make_string(napi_env env, const char *s) {
  napi_value out = NULL;
  napi_create_string_utf8(env, s, NAPI_AUTO_LENGTH, &out);
  return out;
}

napi_value make_buffer_copy(napi_env env, const void *data, size_t len) {
  napi_value out = NULL;
  void *copy;
  napi_create_buffer_copy(env, len, data, &copy, &out);
  return out;
}

void set_prop(napi_env env, napi_value obj, const char *name, napi_value value) {
  if (value != NULL) napi_set_named_property(env, obj, name, value);
}

bool arg_u64_groups(napi_env env, napi_value v, size_t group, const uint64_t **data, size_t *groups) {
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed) return false;
  napi_typedarray_type type;
  size_t length;
  void *base;
  if (napi_get_typedarray_info(env, v, &type, &length, &base, NULL, NULL) != napi_ok) return false;
  if (type != napi_biguint64_array || length % group != 0) return false;
  *data = base;
  *groups = length / group;
  return true;
}

/* One 128-bit tag per handle kind (random constants: only their distinctness matters). */
static const napi_type_tag HANDLE_TAGS[] = {
    [HANDLE_ENGINE] = {0x77707370656e6731ULL, 0x9b1e5c3a2f4d6e01ULL},
    [HANDLE_FREEZE] = {0x77707370667a7231ULL, 0x9b1e5c3a2f4d6e02ULL},
    [HANDLE_TRACKER] = {0x7770737074726b31ULL, 0x9b1e5c3a2f4d6e03ULL},
    [HANDLE_GROUP] = {0x7770737067727031ULL, 0x9b1e5c3a2f4d6e04ULL},
};

napi_status make_handle(napi_env env, void *data, napi_finalize finalize, handle_kind_t kind, napi_value *out) {
  napi_status status = napi_create_external(env, data, finalize, NULL, out);
  if (status != napi_ok) return status;
  return napi_type_tag_object(env, *out, &HANDLE_TAGS[kind]);
}

void *handle_data(napi_env env, napi_value v, handle_kind_t kind) {
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok || type != napi_external) return NULL;
  bool matches = false;
  if (napi_check_object_type_tag(env, v, &HANDLE_TAGS[kind], &matches) != napi_ok || !matches) return NULL;
  void *data = NULL;
  if (napi_get_value_external(env, v, &data) != napi_ok) return NULL;
  return data;
}
