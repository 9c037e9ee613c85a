// SPDX-License-Identifier: GPL-2.0-only
/*
 * nq_queue: an NFQUEUE consumer over raw netlink (no libraries, links fully static).
 *
 * Binds queues BASE..BASE+COUNT-1 (metadata copy mode, a long queue), and accepts every packet
 * DELAY_US microseconds after it was read (packets read in one batch are held together).
 * Creates READY_FILE once every queue is bound, runs until SIGTERM/SIGINT, then prints one JSON line:
 *   {"type":"queue","base":B,"count":C,"bound":N,"bind_error":E,"packets":P,"accepted":A,
 *    "verdict_errors":V,"enobufs":X}
 *
 * Usage: nq_queue [-b base] [-c count] [-d delay_us] [-r ready_file]
 */
#define _GNU_SOURCE
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nq_nfq.h"

#define MAX_HELD (NQ_NFQ_BUFSZ / 64)

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

/* packets read in one batch, held together */
struct batch {
	int held;
	unsigned short queue[MAX_HELD];
	unsigned int id[MAX_HELD];
};

static void hold(void *ctx, unsigned short queue, unsigned int id)
{
	struct batch *b = ctx;

	if (b->held < MAX_HELD) {
		b->queue[b->held] = queue;
		b->id[b->held] = id;
		b->held++;
	}
}

int main(int argc, char **argv)
{
	int base = 0, count = 1, delay_us = 200, opt, fd, i;
	int bound = 0, bind_error = 0;
	long packets = 0, accepted = 0, verdict_errors = 0, enobufs = 0;
	const char *ready = NULL;
	static char buf[NQ_NFQ_BUFSZ];
	static struct batch b;
	struct sigaction act;

	while ((opt = getopt(argc, argv, "b:c:d:r:")) != -1) {
		switch (opt) {
		case 'b':
			base = atoi(optarg);
			break;
		case 'c':
			count = atoi(optarg);
			break;
		case 'd':
			delay_us = atoi(optarg);
			break;
		case 'r':
			ready = optarg;
			break;
		default:
			fprintf(stderr, "usage: nq_queue [-b base] [-c count] [-d delay_us] [-r ready_file]\n");
			return 2;
		}
	}
	memset(&act, 0, sizeof(act));
	act.sa_handler = on_signal;
	sigaction(SIGTERM, &act, NULL);
	sigaction(SIGINT, &act, NULL);

	fd = nq_nfq_open();
	if (fd < 0) {
		bind_error = fd;
		goto out;
	}
	bind_error = nq_nfq_bind_range(fd, base, count, &bound);
	if (ready && bound == count)
		nq_nfq_signal_ready(ready);
	while (!stop && bound == count) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, 100) <= 0)
			continue;
		n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0) {
			if (errno == ENOBUFS)
				enobufs++;
			continue;
		}
		b.held = 0;
		packets += nq_nfq_each_packet(buf, n, hold, &b);
		/* hold the whole batch read at once for delay_us, then accept it */
		if (b.held && delay_us > 0)
			usleep((useconds_t)delay_us);
		for (i = 0; i < b.held; i++) {
			if (nq_nfq_accept(fd, b.queue[i], b.id[i]) == 0)
				accepted++;
			else
				verdict_errors++;
		}
	}
out:
	printf("{\"type\":\"queue\",\"base\":%d,\"count\":%d,\"bound\":%d,\"bind_error\":%d,"
	       "\"packets\":%ld,\"accepted\":%ld,\"verdict_errors\":%ld,\"enobufs\":%ld}\n",
	       base, count, bound, bind_error, packets, accepted, verdict_errors, enobufs);
	return bind_error ? 1 : 0;
}
