/*
 * refserver: the cheapest possible server for the same exchange, in C.
 *
 * It answers every line with one fixed answer and does nothing else, so its
 * figures are what this machine's kernel allows for a unix-socket request:
 * the ceiling against which vmhost's own figures are read.
 *
 * usage: refserver SOCKET ANSWER      (runs until killed)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s SOCKET ANSWER\n", argv[0]);
		return 2;
	}
	size_t alen = strlen(argv[2]);
	char *answer = malloc(alen + 1);
	memcpy(answer, argv[2], alen);
	answer[alen++] = '\n';

	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(argv[1]) >= sizeof addr.sun_path)
		return 2;
	strcpy(addr.sun_path, argv[1]);
	unlink(argv[1]);
	int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
		perror("refserver: listen");
		return 1;
	}
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	puts("serving");
	fflush(stdout);

	struct epoll_event events[256];
	char buf[65536];
	for (;;) {
		int n = epoll_wait(ep, events, 256, -1);
		for (int i = 0; i < n; i++) {
			int fd = events[i].data.fd;
			if (fd == lfd) {
				int c;
				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
					struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
				}
				continue;
			}
			ssize_t r = read(fd, buf, sizeof buf);
			if (r <= 0) {
				if (r == 0 || errno != EAGAIN)
					close(fd);
				continue;
			}
			for (ssize_t j = 0; j < r; j++)
				if (buf[j] == '\n' && send(fd, answer, alen, MSG_NOSIGNAL) != (ssize_t)alen) {
					close(fd);
					break;
				}
		}
	}
}
