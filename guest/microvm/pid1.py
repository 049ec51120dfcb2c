"""PID 1 of the microVM after switch_root: the agent, then power off.

Runs the agent (the 9p share at /opt/jupyter-sandbox) in this process, so that
it is PID 1 exactly as under gVisor (it reaps orphans), and when it returns,
for whatever reason, syncs and powers the VM off, which ends QEMU. A PID 1 that
just exited would panic the guest kernel instead.
"""

import ctypes
import os
import sys
import traceback

AGENT_DIR = "/opt/jupyter-sandbox"
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567

status = 1
try:
    sys.path.insert(0, AGENT_DIR)
    sys.argv = [f"{AGENT_DIR}/agent.py"]
    import agent

    agent.main()
except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
except BaseException:
    traceback.print_exc()
finally:
    try:
        sys.stderr.write(f"pid1: the agent ended with status {status}; powering off\n")
        sys.stderr.flush()
        os.sync()
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.reboot(RB_POWER_OFF)
        libc.reboot(RB_AUTOBOOT)  # QEMU runs with -no-reboot: this ends it too
        os._exit(status)
