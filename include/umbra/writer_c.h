/* The writer library's C API: a thin wrapper over umbra::WriterClient
 * (include/umbra/writer.h; docs/writers.md). Link with the umbra_client
 * library and the C++ runtime.
 *
 *   static int on_event(const char *event, const char *set_id, void *user,
 *                       char *error, size_t error_len) {
 *     if (strcmp(event, "freeze") == 0 && !db_hold_writes(user)) {
 *       snprintf(error, error_len, "could not hold writes");
 *       return -1;                               // veto
 *     }
 *     if (strcmp(event, "thaw") == 0 || strcmp(event, "abort") == 0) db_resume(user);
 *     return 0;
 *   }
 *   const char *vols[] = {"db"};
 *   umbra_writer *w = umbra_writer_start(NULL, "mydb", vols, 1, on_event, db);
 *   ...
 *   umbra_writer_stop(w);
 */
#ifndef UMBRA_WRITER_C_H
#define UMBRA_WRITER_C_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct umbra_writer umbra_writer;

/* Called on the writer's own thread, one event at a time. Return 0 to
 * answer OK; anything else fails (vetoes) the event, with the message the
 * handler wrote into `error` (NUL-terminated, at most error_len bytes). */
typedef int (*umbra_writer_handler)(const char *event, const char *set_id, void *user,
                                    char *error, size_t error_len);

/* Starts a writer named `name` for `volumes` (n_volumes == 0: every
 * volume) on `socket` (NULL: $UMBRA_SOCKET or /run/umbra/umbrad.sock). It
 * connects in the background and reconnects when the connection is lost.
 * Returns NULL only if an argument is invalid. */
umbra_writer *umbra_writer_start(const char *socket, const char *name,
                                 const char *const *volumes, size_t n_volumes,
                                 umbra_writer_handler handler, void *user);

/* 1 once registered with umbrad, 0 if timeout_ms passed first. */
int umbra_writer_wait_registered(umbra_writer *w, int timeout_ms);

/* Disconnects, joins the thread and frees `w`. */
void umbra_writer_stop(umbra_writer *w);

#ifdef __cplusplus
}
#endif

#endif /* UMBRA_WRITER_C_H */
