/* Shared memory of a process group (placeholder until it lands). */
#include "engine_internal.h"

void register_engine_group_exports(napi_env env, napi_value exports) {}
