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
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUFSZ (1 << 16)
#define MAX_HELD (BUFSZ / 64)

static volatile sig_atomic_t stop;
static unsigned int seq;
static pthread_mutex_t seq_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

struct req {
	struct nlmsghdr nlh;
	struct nfgenmsg nfg;
	char attrs[64];
};

static void put_attr(struct req *r, unsigned short type, const void *data, unsigned short len)
{
	struct nlattr *a = (struct nlattr *)((char *)r + NLMSG_ALIGN(r->nlh.nlmsg_len));

	a->nla_type = type;
	a->nla_len = (unsigned short)(NLA_HDRLEN + len);
	memcpy((char *)a + NLA_HDRLEN, data, len);
	r->nlh.nlmsg_len = NLMSG_ALIGN(r->nlh.nlmsg_len) + NLA_ALIGN(a->nla_len);
}

static void init_req(struct req *r, unsigned short msg, unsigned short flags, unsigned short queue)
{
	memset(r, 0, sizeof(*r));
	r->nlh.nlmsg_len = NLMSG_LENGTH(sizeof(struct nfgenmsg));
	r->nlh.nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | msg;
	r->nlh.nlmsg_flags = NLM_F_REQUEST | flags;
	pthread_mutex_lock(&seq_lock);
	r->nlh.nlmsg_seq = ++seq;
	pthread_mutex_unlock(&seq_lock);
	r->nfg.nfgen_family = AF_UNSPEC;
	r->nfg.version = NFNETLINK_V0;
	r->nfg.res_id = htons(queue);
}

/* Send a request with NLM_F_ACK and return the error the kernel acknowledged (0 = success). */
static int request_ack(int fd, struct req *r)
{
	char buf[4096];

	if (send(fd, r, r->nlh.nlmsg_len, 0) < 0)
		return -errno;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (n < 0)
			return -errno;
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned int)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == r->nlh.nlmsg_seq)
				return ((struct nlmsgerr *)NLMSG_DATA(h))->error;
		}
	}
}

static int bind_queue(int fd, unsigned short q)
{
	struct nfqnl_msg_config_cmd cmd = { .command = NFQNL_CFG_CMD_BIND };
	struct nfqnl_msg_config_params params = { .copy_range = htonl(0),
						   .copy_mode = NFQNL_COPY_META };
	unsigned int maxlen = htonl(65536);
	struct req r;
	int err;

	init_req(&r, NFQNL_MSG_CONFIG, NLM_F_ACK, q);
	put_attr(&r, NFQA_CFG_CMD, &cmd, sizeof(cmd));
	err = request_ack(fd, &r);
	if (err)
		return err;
	init_req(&r, NFQNL_MSG_CONFIG, NLM_F_ACK, q);
	put_attr(&r, NFQA_CFG_PARAMS, &params, sizeof(params));
	err = request_ack(fd, &r);
	if (err)
		return err;
	init_req(&r, NFQNL_MSG_CONFIG, NLM_F_ACK, q);
	put_attr(&r, NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof(maxlen));
	return request_ack(fd, &r);
}

static int verdict(int fd, unsigned short q, unsigned int id)
{
	struct nfqnl_msg_verdict_hdr vh = { .verdict = htonl(NF_ACCEPT), .id = id };
	struct req r;

	init_req(&r, NFQNL_MSG_VERDICT, 0, q);
	put_attr(&r, NFQA_VERDICT_HDR, &vh, sizeof(vh));
	return send(fd, &r, r.nlh.nlmsg_len, 0) < 0 ? -errno : 0;
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
		err = verdict(fd, q, id);
		pthread_mutex_lock(&ring_lock);
		if (err)
			verdict_errors++;
		else
			accepted++;
		pthread_mutex_unlock(&ring_lock);
	}
}

int main(int argc, char **argv)
{
	int base = 0, count = 1, workers = 1, opt, i, big = 16 << 20, one = 1;
	int bound = 0, bind_error = 0;
	long packets = 0, enobufs = 0;
	const char *ready = NULL;
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	static char buf[BUFSZ];
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

	fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		bind_error = -errno;
		goto out;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one));
	for (i = 0; i < count; i++) {
		int err = bind_queue(fd, (unsigned short)(base + i));

		if (err) {
			bind_error = err;
			break;
		}
		bound++;
	}
	for (i = 0; i < workers; i++)
		pthread_create(&th[i], NULL, worker, NULL);
	if (ready && bound == count) {
		FILE *f = fopen(ready, "w");

		if (f)
			fclose(f);
	}
	while (!stop && bound == count) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		struct nlmsghdr *h;
		ssize_t n;

		if (poll(&p, 1, 100) <= 0)
			continue;
		n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0) {
			if (errno == ENOBUFS)
				enobufs++;
			continue;
		}
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned int)n); h = NLMSG_NEXT(h, n)) {
			struct nfgenmsg *g = NLMSG_DATA(h);
			struct nlattr *a;
			int rem;

			if ((h->nlmsg_type & 0xff) != NFQNL_MSG_PACKET ||
			    (h->nlmsg_type >> 8) != NFNL_SUBSYS_QUEUE)
				continue;
			a = (struct nlattr *)((char *)g + NLMSG_ALIGN(sizeof(*g)));
			rem = (int)h->nlmsg_len - NLMSG_LENGTH(NLMSG_ALIGN(sizeof(*g)));
			while (rem >= (int)NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= rem) {
				if ((a->nla_type & NLA_TYPE_MASK) == NFQA_PACKET_HDR) {
					struct nfqnl_msg_packet_hdr *ph = (void *)((char *)a + NLA_HDRLEN);

					packets++;
					pthread_mutex_lock(&ring_lock);
					if (ring_head - ring_tail < RING) {
						ring_queue[ring_head % RING] = ntohs(g->res_id);
						ring_id[ring_head % RING] = ph->packet_id;
						ring_head++;
						pthread_cond_signal(&ring_cond);
					} else {
						dropped_ring++;
					}
					pthread_mutex_unlock(&ring_lock);
					break;
				}
				rem -= NLA_ALIGN(a->nla_len);
				a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
			}
		}
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
