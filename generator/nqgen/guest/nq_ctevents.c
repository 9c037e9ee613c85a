// SPDX-License-Identifier: GPL-2.0-only
/*
 * nq_ctevents: a conntrack event listener over raw netlink (ctnetlink NEW/UPDATE/DESTROY groups).
 *
 * Subscribing makes conntrack attach the event cache to new entries, which is what the confirm
 * use-after-free needs (nf_ct_deliver_cached_events() on the clash loser).  Creates READY_FILE once
 * subscribed, counts events until SIGTERM/SIGINT, then prints one JSON line:
 *   {"type":"ctevents","subscribed":1,"error":0,"new":N,"update":U,"destroy":D,"other":O,"enobufs":X}
 *
 * Usage: nq_ctevents [-r ready_file]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <linux/netlink.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static unsigned int group_bit(unsigned int group)
{
	return 1U << (group - 1);
}

int main(int argc, char **argv)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	static char buf[1 << 16];
	const char *ready = NULL;
	long n_new = 0, n_update = 0, n_destroy = 0, n_other = 0, enobufs = 0;
	int fd, opt, error = 0, subscribed = 0, big = 8 << 20;
	struct sigaction act;

	while ((opt = getopt(argc, argv, "r:")) != -1) {
		if (opt == 'r') {
			ready = optarg;
		} else {
			fprintf(stderr, "usage: nq_ctevents [-r ready_file]\n");
			return 2;
		}
	}
	memset(&act, 0, sizeof(act));
	act.sa_handler = on_signal;
	sigaction(SIGTERM, &act, NULL);
	sigaction(SIGINT, &act, NULL);

	sa.nl_groups = group_bit(NFNLGRP_CONNTRACK_NEW) | group_bit(NFNLGRP_CONNTRACK_UPDATE) |
		       group_bit(NFNLGRP_CONNTRACK_DESTROY);
	fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		error = -errno;
		goto out;
	}
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	subscribed = 1;
	if (ready) {
		FILE *f = fopen(ready, "w");

		if (f)
			fclose(f);
	}
	while (!stop) {
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
			unsigned int type = h->nlmsg_type & 0xff;

			if ((h->nlmsg_type >> 8) != NFNL_SUBSYS_CTNETLINK)
				n_other++;
			else if (type == IPCTNL_MSG_CT_DELETE)
				n_destroy++;
			else if (type == IPCTNL_MSG_CT_NEW && (h->nlmsg_flags & (NLM_F_CREATE | NLM_F_EXCL)))
				n_new++;
			else if (type == IPCTNL_MSG_CT_NEW)
				n_update++;
			else
				n_other++;
		}
	}
out:
	printf("{\"type\":\"ctevents\",\"subscribed\":%d,\"error\":%d,\"new\":%ld,\"update\":%ld,"
	       "\"destroy\":%ld,\"other\":%ld,\"enobufs\":%ld}\n",
	       subscribed, error, n_new, n_update, n_destroy, n_other, enobufs);
	return error ? 1 : 0;
}
