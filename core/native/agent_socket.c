/* The controller's end of the agent socket (placeholder until it lands). */
#include "addon.h"

void register_agent_socket_exports(napi_env env, napi_value exports) {}
