/* A writer written in C against include/umbra/writer_c.h (compiled as C, so
 * the header is checked to be valid C). writer_client_test drives it. */
#include <stdio.h>
#include <string.h>

#include "umbra/writer_c.h"

struct c_writer_state {
  char events[512];
};

static int on_event(const char *event, const char *set_id, void *user, char *error,
                    size_t error_len) {
  struct c_writer_state *st = (struct c_writer_state *)user;
  (void)set_id;
  strncat(st->events, event, sizeof st->events - strlen(st->events) - 2);
  strcat(st->events, " ");
  if (strcmp(event, "prepare") == 0) {
    snprintf(error, error_len, "not today");
    return -1;
  }
  return 0;
}

static struct c_writer_state state;

/* Starts a C writer "cw" on `socket`; returns 1 once registered. */
int c_writer_run(const char *socket, umbra_writer **out) {
  const char *vols[] = {"db"};
  memset(&state, 0, sizeof state);
  *out = umbra_writer_start(socket, "cw", vols, 1, on_event, &state);
  return *out != NULL && umbra_writer_wait_registered(*out, 5000);
}

const char *c_writer_events(void) { return state.events; }
