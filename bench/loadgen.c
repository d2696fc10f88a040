/*
 * loadgen: a closed-loop load generator for vmhost's control socket.
 *
 * Python cannot drive a Python server hard enough to measure it, so the load
 * comes from here: one thread, one epoll set, CONC requests always in
 * flight.  In "conn" mode every request is its own connection (dial, write one
 * line, read one line, close), exactly what the Go client does; in "persist"
 * mode each of the CONC connections carries request after request.
 *
 * Every answer is compared byte for byte with EXPECTED; a mismatch, a short
 * answer, a refused connect or a reset counts as a failure, never silently.
 *
 * usage: loadgen SOCKET MODE CONC SECONDS REQUEST EXPECTED
 *   MODE is conn or persist; REQUEST and EXPECTED are lines without "\n".
 * output: one JSON object on stdout (latencies in microseconds, cpu in seconds).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define ANSWER_MAX 4096

struct slot {
	int fd;
	size_t got;
	uint64_t started;
	char buf[ANSWER_MAX];
};

static struct sockaddr_un addr;
static socklen_t addr_len;
static const char *request;
static size_t request_len;
static const char *expected;
static size_t expected_len;
static int persist;
static int ep;

static uint32_t *lat;
static size_t nlat, caplat;
static uint64_t failed, wrong, retried;
static char first_error[256];

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void note_error(const char *what, int err)
{
	failed++;
	if (!first_error[0])
		snprintf(first_error, sizeof first_error, "%s: %s", what, strerror(err));
}

static void record(uint64_t ns)
{
	if (nlat == caplat) {
		caplat = caplat ? caplat * 2 : 1 << 16;
		lat = realloc(lat, caplat * sizeof *lat);
		if (!lat) {
			perror("realloc");
			exit(2);
		}
	}
	lat[nlat++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int send_request(struct slot *s)
{
	s->got = 0;
	s->started = now_ns();
	ssize_t n = send(s->fd, request, request_len, MSG_NOSIGNAL);
	if (n != (ssize_t)request_len) {
		note_error("write", n < 0 ? errno : EMSGSIZE);
		return -1;
	}
	return 0;
}

/* Dial and send; the slot is parked (fd -1) when the backlog is full. */
static int open_slot(struct slot *s)
{
	s->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s->fd < 0) {
		note_error("socket", errno);
		return -1;
	}
	uint64_t t0 = now_ns();
	if (connect(s->fd, (struct sockaddr *)&addr, addr_len) < 0) {
		int err = errno;
		close(s->fd);
		s->fd = -1;
		if (err == EAGAIN) {
			retried++;
			return 0;
		}
		note_error("connect", err);
		return -1;
	}
	if (send_request(s) < 0) {
		close(s->fd);
		s->fd = -1;
		return -1;
	}
	s->started = t0;
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) < 0) {
		perror("epoll_ctl");
		exit(2);
	}
	return 0;
}

static void drop(struct slot *s)
{
	close(s->fd);
	s->fd = -1;
}

/* Read what is there; on a full line check it and start the next request. */
static void readable(struct slot *s)
{
	ssize_t n = read(s->fd, s->buf + s->got, sizeof s->buf - s->got);
	if (n < 0) {
		if (errno == EAGAIN)
			return;
		note_error("read", errno);
		drop(s);
		return;
	}
	if (n == 0) {
		note_error("read", ECONNRESET);
		drop(s);
		return;
	}
	s->got += (size_t)n;
	char *nl = memchr(s->buf, '\n', s->got);
	if (!nl) {
		if (s->got == sizeof s->buf) {
			wrong++;
			drop(s);
		}
		return;
	}
	record(now_ns() - s->started);
	size_t len = (size_t)(nl - s->buf);
	if (len != expected_len || memcmp(s->buf, expected, len) != 0 || s->got != len + 1) {
		if (!wrong)
			fprintf(stderr, "loadgen: unexpected answer: %.*s\n", (int)s->got, s->buf);
		wrong++;
		drop(s);
		return;
	}
	if (persist) {
		if (send_request(s) < 0)
			drop(s);
	} else {
		drop(s);
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static double pct(double p)
{
	if (!nlat)
		return 0;
	size_t i = (size_t)(p * (double)(nlat - 1) + 0.5);
	return lat[i] / 1000.0;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: %s SOCKET conn|persist CONC SECONDS REQUEST EXPECTED\n", argv[0]);
		return 2;
	}
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	if (strlen(argv[1]) >= sizeof addr.sun_path) {
		fprintf(stderr, "loadgen: socket path too long\n");
		return 2;
	}
	strcpy(addr.sun_path, argv[1]);
	addr_len = (socklen_t)sizeof addr;
	persist = strcmp(argv[2], "persist") == 0;
	int conc = atoi(argv[3]);
	double seconds = atof(argv[4]);
	if (conc < 1 || seconds <= 0) {
		fprintf(stderr, "loadgen: bad CONC or SECONDS\n");
		return 2;
	}
	/* Requests go with their newline, as Go's json.Encoder writes them. */
	size_t rl = strlen(argv[5]);
	char *req = malloc(rl + 2);
	memcpy(req, argv[5], rl);
	req[rl] = '\n';
	req[rl + 1] = 0;
	request = req;
	request_len = rl + 1;
	expected = argv[6];
	expected_len = strlen(expected);

	ep = epoll_create1(EPOLL_CLOEXEC);
	struct slot *slots = calloc((size_t)conc, sizeof *slots);
	struct epoll_event *events = calloc((size_t)conc, sizeof *events);
	for (int i = 0; i < conc; i++)
		slots[i].fd = -1;

	double cpu0 = cpu_seconds();
	uint64_t t0 = now_ns();
	uint64_t end = t0 + (uint64_t)(seconds * 1e9);
	uint64_t t = t0;
	while (t < end) {
		int parked = 0;
		for (int i = 0; i < conc; i++) {
			if (slots[i].fd < 0) {
				if (open_slot(&slots[i]) < 0 && failed > 1000)
					goto out;
				parked += slots[i].fd < 0;
			}
		}
		int n = epoll_wait(ep, events, conc, parked ? 0 : 100);
		for (int i = 0; i < n; i++)
			readable(events[i].data.ptr);
		t = now_ns();
	}
out:;
	double elapsed = (double)(now_ns() - t0) / 1e9;
	double cpu = cpu_seconds() - cpu0;
	qsort(lat, nlat, sizeof *lat, cmp_u32);
	printf("{\"requests\":%zu,\"failed\":%llu,\"wrong\":%llu,\"backlog_retries\":%llu,"
	       "\"elapsed\":%.6f,\"rps\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f,\"max_us\":%.1f,"
	       "\"cpu_seconds\":%.4f,\"error\":\"%s\"}\n",
	       nlat, (unsigned long long)failed, (unsigned long long)wrong,
	       (unsigned long long)retried, elapsed, (double)nlat / elapsed, pct(0.5), pct(0.99),
	       nlat ? lat[nlat - 1] / 1000.0 : 0.0, cpu, first_error);
	return failed || wrong ? 1 : 0;
}
