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
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
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
	r->nlh.nlmsg_seq = ++seq;
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

int main(int argc, char **argv)
{
	int base = 0, count = 1, delay_us = 200, opt, fd, i, big = 16 << 20, one = 1;
	int bound = 0, bind_error = 0;
	long packets = 0, accepted = 0, verdict_errors = 0, enobufs = 0;
	const char *ready = NULL;
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	static char buf[BUFSZ];
	static unsigned short held_queue[MAX_HELD];
	static unsigned int held_id[MAX_HELD];
	int held;
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
		held = 0;
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
					if (held < MAX_HELD) {
						held_queue[held] = ntohs(g->res_id);
						held_id[held] = ph->packet_id;
						held++;
					}
					break;
				}
				rem -= NLA_ALIGN(a->nla_len);
				a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
			}
		}
		/* hold the whole batch read at once for delay_us, then accept it */
		if (held && delay_us > 0)
			usleep((useconds_t)delay_us);
		for (i = 0; i < held; i++) {
			if (verdict(fd, held_queue[i], held_id[i]) == 0)
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
