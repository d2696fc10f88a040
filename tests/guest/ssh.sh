#!/bin/sh
# Port 22 of the tiny guest: an SSH-style banner, then an echo of whatever the client sends
# (a long-lived connection to test that a TCP session through the hostfwd survives).
echo SSH-2.0-tinyguest
exec cat
