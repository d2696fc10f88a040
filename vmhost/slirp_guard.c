/*
 * Preloaded into QEMU by vmhost (LD_PRELOAD): turns on libslirp's own
 * disable_host_loopback, which QEMU 7.2 has no -netdev user option for.
 *
 * With it, a guest's connection to the gateway (10.0.2.2, or any other
 * address of the virtual network but the DNS one) is refused instead of
 * going to the host's 127.0.0.1, where other VMs' forwards and local
 * services listen.  hostfwd (host -> guest) and outbound traffic are
 * untouched.  Not a Python module: it is never imported.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include <slirp/libslirp.h>

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque)
{
	Slirp *(*real)(const SlirpConfig *, const SlirpCb *, void *) =
		(Slirp * (*)(const SlirpConfig *, const SlirpCb *, void *)) dlsym(RTLD_NEXT, "slirp_new");

	if (real == NULL) {
		fprintf(stderr, "vmhost slirp guard: no slirp_new to wrap: %s\n", dlerror());
		abort();
	}
	/* The caller's own config (a local in QEMU's net_slirp_init); the field exists since
	 * SlirpConfig version 1, so its offset holds whatever version QEMU was built against. */
	((SlirpConfig *)cfg)->disable_host_loopback = true;
	return real(cfg, callbacks, opaque);
}
