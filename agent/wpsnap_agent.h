/* The wpsnap cooperative agent: link it into a program (or LD_PRELOAD
 * libwpsnap-agent.so with WPSNAP_SOCKET=PATH) and `wpsnap serve --socket PATH`
 * can snapshot the program without ptrace. The wire protocol below is
 * specified in snapshot-format/FORMAT.md, "The agent protocol"; the controller's end
 * (core/native/agent_socket.c) includes this header, so both sides share one
 * definition of every constant. */
#ifndef WPSNAP_AGENT_H
#define WPSNAP_AGENT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Start the agent's service thread, which connects to the unix socket at
 * socket_path (retrying every 200 ms while no server listens) and serves its
 * requests. Once per process: later calls return 0 and do nothing. NULL or ""
 * does nothing. 0, or an errno (the thread could not be created). */
int wpsnap_agent_start(const char *socket_path);

/* ---- wire protocol (little-endian) ---- */
#define WPSNAP_AGENT_MAGIC 0x47415057u /* "WPAG" */
#define WPSNAP_AGENT_VERSION 1u
#define WPSNAP_AGENT_HEADER_BYTES 16u
/* No message's payload is longer: checked before anything is read. */
#define WPSNAP_AGENT_MAX_PAYLOAD (16u << 20)

enum wpsnap_agent_op {
  WPSNAP_AGENT_HELLO = 1,  /* agent -> controller, once per connection */
  WPSNAP_AGENT_FREEZE = 2, /* controller -> agent */
  WPSNAP_AGENT_FROZEN = 3, /* agent -> controller, carries the userfaultfd (SCM_RIGHTS) */
  WPSNAP_AGENT_THAW = 4,   /* controller -> agent, no reply */
  WPSNAP_AGENT_DONE = 5,   /* controller -> agent: the session is over */
  WPSNAP_AGENT_ERROR = 6,  /* agent -> controller: a FREEZE failed, every thread runs */
};

struct wpsnap_agent_header {
  uint32_t magic;   /* WPSNAP_AGENT_MAGIC */
  uint16_t version; /* WPSNAP_AGENT_VERSION */
  uint16_t op;      /* enum wpsnap_agent_op */
  uint32_t length;  /* payload bytes that follow, <= WPSNAP_AGENT_MAX_PAYLOAD */
  uint32_t reserved; /* 0 */
};

/* HELLO payload. */
struct wpsnap_agent_hello {
  uint32_t pid;
  uint32_t flags; /* WPSNAP_AGENT_HELLO_LINKED when linked in, 0 when preloaded */
  char comm[16];  /* prctl(PR_GET_NAME), NUL-padded */
};
#define WPSNAP_AGENT_HELLO_LINKED 1u

/* FREEZE payload: how long the agent waits for every thread to reach the
 * barrier before it gives up (ERROR ETIMEDOUT); 0: 2000 ms. */
struct wpsnap_agent_freeze {
  uint32_t timeout_ms;
  uint32_t reserved;
};

/* FROZEN payload: this, then `threads` records. */
struct wpsnap_agent_frozen {
  uint32_t threads;
  uint32_t reserved;
};
/* One thread record: this, regs, fpregs, then xstate_len bytes of XSAVE area
 * and zero padding to a multiple of 8. */
struct wpsnap_agent_thread {
  uint32_t tid;
  uint32_t xstate_len;
  uint64_t sigmask; /* signals blocked at the interruption: bit n-1 for signal n */
};
#define WPSNAP_AGENT_REGS_BYTES 216u   /* struct user_regs_struct */
#define WPSNAP_AGENT_FPREGS_BYTES 512u /* struct user_fpregs_struct (FXSAVE) */

/* ERROR payload: this, then a UTF-8 message (not NUL-terminated). */
struct wpsnap_agent_error {
  int32_t err; /* an errno */
  uint32_t reserved;
};

#ifdef __cplusplus
}
#endif
#endif
