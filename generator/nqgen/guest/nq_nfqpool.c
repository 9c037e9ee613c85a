// SPDX-License-Identifier: GPL-2.0-only
/*
 * nq_nfqpool: an NFQUEUE consumer with a pool of verdict threads (raw netlink, links fully static).
 *
 * The node scenario's stand-in for the NFQUEUE consumer of a real node (a policy or inspection agent).
 * One thread reads packets from queues BASE..BASE+COUNT-1; WORKERS threads each take the next packet,
 * hold it DELAY_US microseconds and accept it. With one worker, verdicts follow the arrival order one
 * at a time; with several, packets read together are released at about the same moment from
 * different threads (and CPUs), as a consumer with a worker pool does.
 * Creates READY_FILE once every queue is bound, runs until SIGTERM/SIGINT, then prints one JSON line:
 *   {"type":"queue","base":B,"count":C,"workers":W,"bound":N,"bind_error":E,"packets":P,"accepted":A,
 *    "verdict_errors":V,"enobufs":X}
 *
 * Usage: nq_nfqpool [-b base] [-c count] [-d delay_us] [-w workers] [-r ready_file]
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nq_nfq.h"

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

#define RING 4096
#define MAX_WORKERS 16

static pthread_mutex_t ring_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ring_cond = PTHREAD_COND_INITIALIZER;
static unsigned short ring_queue[RING];
static unsigned int ring_id[RING];
static unsigned int ring_head, ring_tail;
static int fd, delay_us = 200;
static long accepted, verdict_errors, dropped_ring;

static void *worker(void *arg)
{
	(void)arg;
	for (;;) {
		unsigned short q;
		unsigned int id;
		int err;

		pthread_mutex_lock(&ring_lock);
		while (ring_head == ring_tail && !stop)
			pthread_cond_wait(&ring_cond, &ring_lock);
		if (ring_head == ring_tail) {
			pthread_mutex_unlock(&ring_lock);
			return NULL;
		}
		q = ring_queue[ring_tail % RING];
		id = ring_id[ring_tail % RING];
		ring_tail++;
		pthread_mutex_unlock(&ring_lock);
		if (delay_us > 0)
			usleep((useconds_t)delay_us);
		err = nq_nfq_accept(fd, q, id);
		pthread_mutex_lock(&ring_lock);
		if (err)
			verdict_errors++;
		else
			accepted++;
		pthread_mutex_unlock(&ring_lock);
	}
}

/* hand one read packet to the pool */
static void enqueue(void *ctx, unsigned short queue, unsigned int id)
{
	(void)ctx;
	pthread_mutex_lock(&ring_lock);
	if (ring_head - ring_tail < RING) {
		ring_queue[ring_head % RING] = queue;
		ring_id[ring_head % RING] = id;
		ring_head++;
		pthread_cond_signal(&ring_cond);
	} else {
		dropped_ring++;
	}
	pthread_mutex_unlock(&ring_lock);
}

int main(int argc, char **argv)
{
	int base = 0, count = 1, workers = 1, opt, i;
	int bound = 0, bind_error = 0;
	long packets = 0, enobufs = 0;
	const char *ready = NULL;
	static char buf[NQ_NFQ_BUFSZ];
	pthread_t th[MAX_WORKERS];
	struct sigaction act;

	while ((opt = getopt(argc, argv, "b:c:d:w:r:")) != -1) {
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
		case 'w':
			workers = atoi(optarg);
			break;
		case 'r':
			ready = optarg;
			break;
		default:
			fprintf(stderr, "usage: nq_nfqpool [-b base] [-c count] [-d delay_us] [-w workers] [-r ready_file]\n");
			return 2;
		}
	}
	if (workers < 1 || workers > MAX_WORKERS || count < 1) {
		fprintf(stderr, "nq_nfqpool: bad arguments\n");
		return 2;
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
	for (i = 0; i < workers; i++)
		pthread_create(&th[i], NULL, worker, NULL);
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
		packets += nq_nfq_each_packet(buf, n, enqueue, NULL);
	}
	pthread_mutex_lock(&ring_lock);
	stop = 1;
	pthread_cond_broadcast(&ring_cond);
	pthread_mutex_unlock(&ring_lock);
	for (i = 0; i < workers; i++)
		pthread_join(th[i], NULL);
out:
	printf("{\"type\":\"queue\",\"base\":%d,\"count\":%d,\"workers\":%d,\"bound\":%d,\"bind_error\":%d,"
	       "\"packets\":%ld,\"accepted\":%ld,\"verdict_errors\":%ld,\"enobufs\":%ld,\"ring_full\":%ld}\n",
	       base, count, workers, bound, bind_error, packets, accepted, verdict_errors, enobufs, dropped_ring);
	return bind_error ? 1 : 0;
}
