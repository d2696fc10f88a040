/*
 * Preloaded into QEMU by vmhost (LD_PRELOAD), it sets up two things on
 * QEMU's user network that QEMU 7.2 has no -netdev user option for, both
 * with libslirp's own API:
 *
 * - disable_host_loopback (unless VMHOST_SLIRP_HOST_LOOPBACK=1): a guest's
 *   connection to the gateway 10.0.2.2, or to any other address of the
 *   virtual network but the DNS one, is refused instead of going to the
 *   host's 127.0.0.1, where other VMs' forwards and local services listen.
 *   hostfwd (host -> guest) and outbound traffic are untouched.
 *
 * - VMHOST_SLIRP_AGENT_SOCKET=PATH: a forward from the unix socket PATH
 *   (created by QEMU, mode from its umask) to the guest agent's port 1024,
 *   so vmhost reaches the agent through a file only it may connect to,
 *   never through a TCP port every local user and guest can reach.
 *
 * Not a Python module: it is never imported.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include <slirp/libslirp.h>

#define AGENT_GUEST_PORT 1024

typedef Slirp *slirp_new_fn(const SlirpConfig *, const SlirpCb *, void *);

static void die(const char *what)
{
	fprintf(stderr, "vmhost slirp guard: %s\n", what);
	abort();
}

static void forward_agent(Slirp *slirp, const SlirpConfig *cfg, const char *path)
{
	struct sockaddr_un host = {.sun_family = AF_UNIX};
	struct sockaddr_in guest = {
		.sin_family = AF_INET,
		.sin_addr = cfg->vdhcp_start, /* the address QEMU's own hostfwd defaults to */
		.sin_port = htons(AGENT_GUEST_PORT),
	};

	if (strlen(path) >= sizeof(host.sun_path))
		die("agent socket path too long");
	strcpy(host.sun_path, path);
	if (slirp_add_hostxfwd(slirp, (struct sockaddr *)&host, sizeof(host),
			       (struct sockaddr *)&guest, sizeof(guest), 0) < 0) {
		perror("vmhost slirp guard: agent socket forward");
		abort();
	}
}

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque)
{
	slirp_new_fn *real = (slirp_new_fn *)dlsym(RTLD_NEXT, "slirp_new");
	const char *loopback = getenv("VMHOST_SLIRP_HOST_LOOPBACK");
	const char *agent = getenv("VMHOST_SLIRP_AGENT_SOCKET");
	Slirp *slirp;

	if (real == NULL)
		die("no slirp_new to wrap");
	/* The caller's own config (a local in QEMU's net_slirp_init); the field exists since
	 * SlirpConfig version 1, so its offset holds whatever version QEMU was built against. */
	if (loopback == NULL || strcmp(loopback, "1") != 0)
		((SlirpConfig *)cfg)->disable_host_loopback = true;
	slirp = real(cfg, callbacks, opaque);
	if (slirp != NULL && agent != NULL && *agent != '\0')
		forward_agent(slirp, cfg, agent);
	return slirp;
}
