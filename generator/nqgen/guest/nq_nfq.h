/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The raw-netlink NFQUEUE pieces the lab's consumers share (nq_queue, nq_nfqpool).
 *
 * No libraries (the programs link fully static): open a NETLINK_NETFILTER socket with a large
 * receive buffer, bind a queue (metadata copy mode, a long queue), accept a packet, and walk a
 * received batch calling back once per queued packet. Requests carry a sequence number taken
 * atomically, so verdicts may be sent from several threads on one socket.
 */
#ifndef NQ_NFQ_H
#define NQ_NFQ_H

#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define NQ_NFQ_BUFSZ (1 << 16)

static unsigned int nq_nfq_seq;

struct nq_nfq_req {
	struct nlmsghdr nlh;
	struct nfgenmsg nfg;
	char attrs[64];
};

static inline void nq_nfq_put_attr(struct nq_nfq_req *r, unsigned short type, const void *data,
				   unsigned short len)
{
	struct nlattr *a = (struct nlattr *)((char *)r + NLMSG_ALIGN(r->nlh.nlmsg_len));

	a->nla_type = type;
	a->nla_len = (unsigned short)(NLA_HDRLEN + len);
	memcpy((char *)a + NLA_HDRLEN, data, len);
	r->nlh.nlmsg_len = NLMSG_ALIGN(r->nlh.nlmsg_len) + NLA_ALIGN(a->nla_len);
}

static inline void nq_nfq_init_req(struct nq_nfq_req *r, unsigned short msg, unsigned short flags,
				   unsigned short queue)
{
	memset(r, 0, sizeof(*r));
	r->nlh.nlmsg_len = NLMSG_LENGTH(sizeof(struct nfgenmsg));
	r->nlh.nlmsg_type = (NFNL_SUBSYS_QUEUE << 8) | msg;
	r->nlh.nlmsg_flags = NLM_F_REQUEST | flags;
	r->nlh.nlmsg_seq = __atomic_add_fetch(&nq_nfq_seq, 1, __ATOMIC_RELAXED);
	r->nfg.nfgen_family = AF_UNSPEC;
	r->nfg.version = NFNETLINK_V0;
	r->nfg.res_id = htons(queue);
}

/* Send a request with NLM_F_ACK and return the error the kernel acknowledged (0 = success). */
static inline int nq_nfq_request_ack(int fd, struct nq_nfq_req *r)
{
	char buf[4096];

	if (send(fd, r, r->nlh.nlmsg_len, 0) < 0)
		return -errno;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h;

		if (n < 0)
			return -errno;
		for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned int)n);
		     h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == r->nlh.nlmsg_seq)
				return ((struct nlmsgerr *)NLMSG_DATA(h))->error;
		}
	}
}

/* A NETLINK_NETFILTER socket with a 16 MiB receive buffer and no ENOBUFS reports; fd or -errno. */
static inline int nq_nfq_open(void)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int fd, big = 16 << 20, one = 1;

	fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof(one));
	return fd;
}

/* Bind queue q: metadata copy mode, a queue of 65536 packets. */
static inline int nq_nfq_bind_queue(int fd, unsigned short q)
{
	struct nfqnl_msg_config_cmd cmd = { .command = NFQNL_CFG_CMD_BIND };
	struct nfqnl_msg_config_params params = { .copy_range = htonl(0),
						   .copy_mode = NFQNL_COPY_META };
	unsigned int maxlen = htonl(65536);
	struct nq_nfq_req r;
	int err;

	nq_nfq_init_req(&r, NFQNL_MSG_CONFIG, NLM_F_ACK, q);
	nq_nfq_put_attr(&r, NFQA_CFG_CMD, &cmd, sizeof(cmd));
	err = nq_nfq_request_ack(fd, &r);
	if (err)
		return err;
	nq_nfq_init_req(&r, NFQNL_MSG_CONFIG, NLM_F_ACK, q);
	nq_nfq_put_attr(&r, NFQA_CFG_PARAMS, &params, sizeof(params));
	err = nq_nfq_request_ack(fd, &r);
	if (err)
		return err;
	nq_nfq_init_req(&r, NFQNL_MSG_CONFIG, NLM_F_ACK, q);
	nq_nfq_put_attr(&r, NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof(maxlen));
	return nq_nfq_request_ack(fd, &r);
}

/* Bind queues base..base+count-1 in order; *bound counts those bound. 0 or the first error. */
static inline int nq_nfq_bind_range(int fd, int base, int count, int *bound)
{
	int i, err;

	*bound = 0;
	for (i = 0; i < count; i++) {
		err = nq_nfq_bind_queue(fd, (unsigned short)(base + i));
		if (err)
			return err;
		(*bound)++;
	}
	return 0;
}

/* Tell the guest script the consumer is bound: create the (empty) file at path. */
static inline void nq_nfq_signal_ready(const char *path)
{
	FILE *f = fopen(path, "w");

	if (f)
		fclose(f);
}

/* Accept packet id (network order, as the kernel sent it) of queue q. */
static inline int nq_nfq_accept(int fd, unsigned short q, unsigned int id)
{
	struct nfqnl_msg_verdict_hdr vh = { .verdict = htonl(NF_ACCEPT), .id = id };
	struct nq_nfq_req r;

	nq_nfq_init_req(&r, NFQNL_MSG_VERDICT, 0, q);
	nq_nfq_put_attr(&r, NFQA_VERDICT_HDR, &vh, sizeof(vh));
	return send(fd, &r, r.nlh.nlmsg_len, 0) < 0 ? -errno : 0;
}

typedef void (*nq_nfq_packet_fn)(void *ctx, unsigned short queue, unsigned int id);

/* Call fn(ctx, queue, id) for each queued packet in a batch of n bytes; return their number. */
static inline long nq_nfq_each_packet(char *buf, ssize_t n, nq_nfq_packet_fn fn, void *ctx)
{
	struct nlmsghdr *h;
	long packets = 0;

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
				fn(ctx, ntohs(g->res_id), ph->packet_id);
				break;
			}
			rem -= NLA_ALIGN(a->nla_len);
			a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
		}
	}
	return packets;
}

#endif /* NQ_NFQ_H */
