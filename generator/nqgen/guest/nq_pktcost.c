// SPDX-License-Identifier: GPL-2.0-only
/*
 * nq_pktcost: the packet-path cost lab's sender, timing itself.
 *
 * Per family, COUNT UDP sockets are bound to source ports SPORT..SPORT+COUNT-1 on loopback (untimed).
 * "new": one datagram from each socket, timed with CLOCK_MONOTONIC around the send loop only: every
 * datagram creates a conntrack entry and confirms it (the loopback receive runs in the sender's
 * softirq, so its hooks are in the time too).  "established": REPEAT more datagrams from each socket,
 * timed the same way: the entries exist, so conntrack finds them and the confirm returns early.
 * The receiver is drained after each timed loop, outside the timing, and counts what arrived.
 *
 * Output: one JSON line per family and kind on stdout:
 *   {"type":"pktcost","family":"ipv4","kind":"new","datagrams":N,"ns":T,"sent":S,"received":R}
 *
 * Usage: nq_pktcost [-f 4|6|46] [-n count] [-e repeat] [-s sport_base] [-p dport]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_COUNT 4000

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static socklen_t loopback(struct sockaddr_storage *ss, int v6, int port)
{
	memset(ss, 0, sizeof(*ss));
	if (v6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;

		a->sin6_family = AF_INET6;
		a->sin6_port = htons((unsigned short)port);
		a->sin6_addr = in6addr_loopback;
		return sizeof(*a);
	}
	struct sockaddr_in *a = (struct sockaddr_in *)ss;

	a->sin_family = AF_INET;
	a->sin_port = htons((unsigned short)port);
	a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sizeof(*a);
}

static long drain(int rx, long want)
{
	char buf[64];
	long got = 0;
	struct pollfd p = { .fd = rx, .events = POLLIN };

	while (got < want) {
		if (recv(rx, buf, sizeof(buf), MSG_DONTWAIT) >= 0) {
			got++;
			continue;
		}
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			break;
		if (poll(&p, 1, 300) <= 0)
			break;
	}
	return got;
}

static void report(const char *fam, const char *kind, long datagrams, long long ns, long sent, long received)
{
	printf("{\"type\":\"pktcost\",\"family\":\"%s\",\"kind\":\"%s\",\"datagrams\":%ld,\"ns\":%lld,"
	       "\"sent\":%ld,\"received\":%ld}\n", fam, kind, datagrams, ns, sent, received);
}

static int run_family(int v6, int count, int repeat, int sport, int dport)
{
	static int fds[MAX_COUNT];
	const char *fam = v6 ? "ipv6" : "ipv4";
	int domain = v6 ? AF_INET6 : AF_INET, big = 16 << 20, rx, i, k;
	struct sockaddr_storage dst, src;
	socklen_t dlen = loopback(&dst, v6, dport), slen;
	long sent = 0;
	long long t0, t1;
	char payload[16];

	memset(payload, 'c', sizeof(payload));
	rx = socket(domain, SOCK_DGRAM, 0);
	if (rx < 0 || bind(rx, (struct sockaddr *)&dst, dlen) < 0) {
		perror("receiver");
		return 1;
	}
	if (setsockopt(rx, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0)
		setsockopt(rx, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	for (i = 0; i < count; i++) {
		fds[i] = socket(domain, SOCK_DGRAM, 0);
		slen = loopback(&src, v6, sport + i);
		if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&src, slen) < 0 ||
		    connect(fds[i], (struct sockaddr *)&dst, dlen) < 0) {
			perror("sender socket");
			return 1;
		}
	}
	t0 = now_ns();
	for (i = 0; i < count; i++)
		sent += send(fds[i], payload, sizeof(payload), 0) == (ssize_t)sizeof(payload);
	t1 = now_ns();
	report(fam, "new", count, t1 - t0, sent, drain(rx, count));
	sent = 0;
	t0 = now_ns();
	for (k = 0; k < repeat; k++)
		for (i = 0; i < count; i++)
			sent += send(fds[i], payload, sizeof(payload), 0) == (ssize_t)sizeof(payload);
	t1 = now_ns();
	report(fam, "established", (long)count * repeat, t1 - t0, sent, drain(rx, (long)count * repeat));
	for (i = 0; i < count; i++)
		close(fds[i]);
	close(rx);
	return 0;
}

int main(int argc, char **argv)
{
	const char *fams = "46";
	int count = 500, repeat = 4, sport = 20000, dport = 5000, opt, i;
	struct rlimit lim = { MAX_COUNT + 64, MAX_COUNT + 64 };

	while ((opt = getopt(argc, argv, "f:n:e:s:p:")) != -1) {
		switch (opt) {
		case 'f':
			fams = optarg;
			break;
		case 'n':
			count = atoi(optarg);
			break;
		case 'e':
			repeat = atoi(optarg);
			break;
		case 's':
			sport = atoi(optarg);
			break;
		case 'p':
			dport = atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: nq_pktcost [-f 4|6|46] [-n count] [-e repeat] [-s sport] [-p dport]\n");
			return 2;
		}
	}
	if (count < 1 || count > MAX_COUNT || repeat < 1 || sport < 1024 || sport + count > 65535) {
		fprintf(stderr, "nq_pktcost: bad count/repeat/sport\n");
		return 2;
	}
	setrlimit(RLIMIT_NOFILE, &lim);
	for (i = 0; fams[i]; i++) {
		if (fams[i] != '4' && fams[i] != '6')
			continue;
		if (run_family(fams[i] == '6', count, repeat, sport, dport))
			return 1;
		fflush(stdout);
	}
	return 0;
}
