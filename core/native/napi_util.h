/* Small helpers for the Node-API glue: argument parsing and the one error shape
 * that crosses into JS (message, code = errno name, errno, syscall). */
#ifndef WPSNAP_NAPI_UTIL_H
#define WPSNAP_NAPI_UTIL_H

#include <node_api.h>
#include <stdint.h>
#include <stdbool.h>

#define NAPI_CALL(env, call)                                                   \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error((env), "EINTERNAL", "Node-API call failed: " #call);    \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

/* Throw Error("<what>: <strerror> (<ENAME>)") with code/errno/syscall set. Returns NULL. */
napi_value throw_errno(napi_env env, int err, const char *syscall, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Throw a TypeError for a bad argument. Returns NULL. */
napi_value throw_type(napi_env env, const char *message);

/* Name of an errno ("EPERM"); "UNKNOWN_ERRNO_<n>" for unknown ones (static buffer per thread). */
const char *errno_name(int err);

bool arg_int32(napi_env env, napi_value v, int32_t *out);
bool arg_uint64(napi_env env, napi_value v, uint64_t *out); /* Number or BigInt */
bool arg_bool(napi_env env, napi_value v, bool *out);
bool arg_buffer(napi_env env, napi_value v, void **data, size_t *len);
/* A BigUint64Array whose length is a multiple of `group` (pairs, triples…). */
bool arg_u64_groups(napi_env env, napi_value v, size_t group, const uint64_t **data, size_t *groups);
bool prop_uint64(napi_env env, napi_value obj, const char *name, uint64_t *out);
bool prop_int32(napi_env env, napi_value obj, const char *name, int32_t *out);

/* size_t argc and napi_value argv[n] of the current call (argc: how many were passed, at most n). */
#define CALL_ARGS(n)        \
  size_t argc = (n);        \
  napi_value argv[(n)];     \
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL))

/* Native handles are externals tagged with their kind (napi_type_tag_object),
 * so that a handle of one kind passed where another is expected is refused,
 * not reinterpreted. */
typedef enum { HANDLE_ENGINE = 1, HANDLE_FREEZE = 2, HANDLE_TRACKER = 3, HANDLE_GROUP = 4 } handle_kind_t;
/* An external wrapping data, tagged as kind; finalize runs when JS drops it. */
napi_status make_handle(napi_env env, void *data, napi_finalize finalize, handle_kind_t kind, napi_value *out);
/* The data of a handle of this kind, or NULL if v is not one (another kind, or not a handle). */
void *handle_data(napi_env env, napi_value v, handle_kind_t kind);

napi_value make_bigint(napi_env env, uint64_t v);
napi_value make_int(napi_env env, int64_t v);
napi_value make_double(napi_env env, double v);
napi_value make_string(napi_env env, const char *s);
napi_value make_buffer_copy(napi_env env, const void *data, size_t len);
void set_prop(napi_env env, napi_value obj, const char *name, napi_value value);

#endif
