// umbrad's NBD socket: a Server whose connections speak NBD
// (frontend/nbd) over the exports Daemon::NbdOpen names. Who may connect is
// decided by the same rule as the control socket; anyone else is dropped
// before the greeting. Protocol coverage: docs/protocol/nbd.md.
#pragma once

#include "daemon/daemon.h"
#include "daemon/server.h"

namespace umbra::daemon {

Server::Handler NbdHandler(Daemon* daemon);

}  // namespace umbra::daemon
