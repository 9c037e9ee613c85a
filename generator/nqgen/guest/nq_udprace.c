// SPDX-License-Identifier: GPL-2.0-only
/*
 * nq_udprace: racing first datagrams of many UDP flows, and a receiver counting what arrived.
 *
 * Per round and family, one UDP socket is bound to a fresh source port; THREADS threads wait on a
 * barrier and then each send one datagram from that socket to the receiver, so the first packets of
 * one flow traverse conntrack on several CPUs at once and race at confirm (clash resolution).
 * A receiver thread per family counts the datagrams that arrived.  When the senders are done the
 * receivers drain until everything arrived or nothing arrived for DRAIN_MS.
 *
 * Output: one JSON line per family on stdout:
 *   {"type":"traffic","name":N,"family":"ipv4","rounds":R,"threads":T,"sent":S,"send_errors":E,"received":C}
 *
 * Usage: nq_udprace [-r rounds] [-t threads] [-f 4|6|46] [-p dport] [-s sport_base] [-w drain_ms] [-n name]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 16

struct family {
	const char *name;
	int domain;
	struct sockaddr_storage dst;
	socklen_t dst_len;
	int rx_fd;
	atomic_long received;
	long sent;
	long send_errors;
};

static struct family families[2];
static int nfamilies;
static atomic_int stop_rx;
static pthread_barrier_t barrier;
static int round_fd = -1;
static struct family *round_fam;
static atomic_long round_sent;
static atomic_long round_errors;
static int nthreads = 2;
static long rounds = 500;

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void set_addr(struct family *f, int v6, int port)
{
	memset(&f->dst, 0, sizeof(f->dst));
	if (v6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&f->dst;

		a->sin6_family = AF_INET6;
		a->sin6_port = htons((unsigned short)port);
		a->sin6_addr = in6addr_loopback;
		f->dst_len = sizeof(*a);
		f->domain = AF_INET6;
		f->name = "ipv6";
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&f->dst;

		a->sin_family = AF_INET;
		a->sin_port = htons((unsigned short)port);
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		f->dst_len = sizeof(*a);
		f->domain = AF_INET;
		f->name = "ipv4";
	}
}

static int bind_port(int fd, int domain, int port)
{
	struct sockaddr_storage ss;
	socklen_t len;

	memset(&ss, 0, sizeof(ss));
	if (domain == AF_INET6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;

		a->sin6_family = AF_INET6;
		a->sin6_port = htons((unsigned short)port);
		a->sin6_addr = in6addr_loopback;
		len = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;

		a->sin_family = AF_INET;
		a->sin_port = htons((unsigned short)port);
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		len = sizeof(*a);
	}
	return bind(fd, (struct sockaddr *)&ss, len);
}

static void *rx_main(void *arg)
{
	struct family *f = arg;
	char buf[256];

	while (!atomic_load(&stop_rx)) {
		struct pollfd p = { .fd = f->rx_fd, .events = POLLIN };

		if (poll(&p, 1, 50) <= 0)
			continue;
		while (recv(f->rx_fd, buf, sizeof(buf), MSG_DONTWAIT) >= 0)
			atomic_fetch_add(&f->received, 1);
	}
	return NULL;
}

static void *tx_main(void *arg)
{
	long r;
	char payload[16];

	(void)arg;
	memset(payload, 'n', sizeof(payload));
	for (;;) {
		pthread_barrier_wait(&barrier);		/* round starts */
		if (round_fd < 0)
			break;
		r = sendto(round_fd, payload, sizeof(payload), 0,
			   (struct sockaddr *)&round_fam->dst, round_fam->dst_len);
		if (r < 0)
			atomic_fetch_add(&round_errors, 1);
		else
			atomic_fetch_add(&round_sent, 1);
		pthread_barrier_wait(&barrier);		/* round ends */
	}
	return NULL;
}

int main(int argc, char **argv)
{
	const char *fams = "46", *name = "workload";
	int dport = 5000, sport_base = 20000, drain_ms = 1500, opt, i;
	pthread_t tx[MAX_THREADS], rx[2];

	while ((opt = getopt(argc, argv, "r:t:f:p:s:w:n:")) != -1) {
		switch (opt) {
		case 'r':
			rounds = atol(optarg);
			break;
		case 't':
			nthreads = atoi(optarg);
			break;
		case 'f':
			fams = optarg;
			break;
		case 'p':
			dport = atoi(optarg);
			break;
		case 's':
			sport_base = atoi(optarg);
			break;
		case 'w':
			drain_ms = atoi(optarg);
			break;
		case 'n':
			name = optarg;
			break;
		default:
			fprintf(stderr, "usage: nq_udprace [-r rounds] [-t threads] [-f 4|6|46] [-p dport] [-s sport] [-w ms] [-n name]\n");
			return 2;
		}
	}
	if (nthreads < 1 || nthreads > MAX_THREADS || rounds < 0 || sport_base + rounds > 65535) {
		fprintf(stderr, "nq_udprace: bad threads/rounds\n");
		return 2;
	}
	for (i = 0; fams[i] && nfamilies < 2; i++) {
		struct family *f = &families[nfamilies];
		int one = 1, big = 8 << 20;

		if (fams[i] != '4' && fams[i] != '6')
			continue;
		set_addr(f, fams[i] == '6', dport);
		f->rx_fd = socket(f->domain, SOCK_DGRAM, 0);
		if (f->rx_fd < 0) {
			perror("socket");
			return 1;
		}
		setsockopt(f->rx_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (setsockopt(f->rx_fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0)
			setsockopt(f->rx_fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
		if (bind(f->rx_fd, (struct sockaddr *)&f->dst, f->dst_len) < 0) {
			perror("bind receiver");
			return 1;
		}
		nfamilies++;
	}
	pthread_barrier_init(&barrier, NULL, (unsigned int)nthreads + 1);
	for (i = 0; i < nfamilies; i++)
		pthread_create(&rx[i], NULL, rx_main, &families[i]);
	for (i = 0; i < nthreads; i++)
		pthread_create(&tx[i], NULL, tx_main, NULL);

	for (i = 0; i < nfamilies; i++) {
		struct family *f = &families[i];
		long r;

		for (r = 0; r < rounds; r++) {
			int fd = socket(f->domain, SOCK_DGRAM, 0);

			if (fd < 0 || bind_port(fd, f->domain, sport_base + (int)r) < 0) {
				f->send_errors += nthreads;
				if (fd >= 0)
					close(fd);
				continue;
			}
			atomic_store(&round_sent, 0);
			atomic_store(&round_errors, 0);
			round_fam = f;
			round_fd = fd;
			pthread_barrier_wait(&barrier);
			pthread_barrier_wait(&barrier);
			f->sent += atomic_load(&round_sent);
			f->send_errors += atomic_load(&round_errors);
			round_fd = -1;
			close(fd);
		}
	}
	round_fd = -1;
	pthread_barrier_wait(&barrier);
	for (i = 0; i < nthreads; i++)
		pthread_join(tx[i], NULL);

	for (i = 0; i < nfamilies; i++) {
		struct family *f = &families[i];
		long last = -1, since = now_ms();

		while (atomic_load(&f->received) < f->sent) {
			long got = atomic_load(&f->received);

			if (got != last) {
				last = got;
				since = now_ms();
			} else if (now_ms() - since > drain_ms) {
				break;
			}
			usleep(10000);
		}
	}
	atomic_store(&stop_rx, 1);
	for (i = 0; i < nfamilies; i++)
		pthread_join(rx[i], NULL);
	for (i = 0; i < nfamilies; i++) {
		struct family *f = &families[i];

		printf("{\"type\":\"traffic\",\"name\":\"%s\",\"family\":\"%s\",\"rounds\":%ld,\"threads\":%d,"
		       "\"sent\":%ld,\"send_errors\":%ld,\"received\":%ld}\n",
		       name, f->name, rounds, nthreads, f->sent, f->send_errors,
		       atomic_load(&f->received));
	}
	return 0;
}
