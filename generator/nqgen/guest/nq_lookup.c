// SPDX-License-Identifier: GPL-2.0-only
/*
 * nq_lookup: glibc's own resolver as a pod's DNS client (linked dynamically against the distribution's glibc).
 *
 * THREADS threads call getaddrinfo(AF_UNSPEC) for the names h<I>.<DOMAIN>, I = FIRST..FIRST+COUNT-1: glibc
 * sends the A and AAAA queries of each lookup in parallel from one UDP socket (sendmmsg), as in a pod.
 * Every answer is checked against the data the DNS server was given: h<I> has exactly
 * A 100.64.<I/256>.<I%256> and AAAA 2001:db8:64::<I in hex>. No new lookup starts after DEADLINE seconds.
 * Prints one JSON line:
 *   {"type":"lookups","tag":T,"planned":N,"started":S,"ok":O,"a_only":A,"aaaa_only":B,"wrong":W,"failed":F,
 *    "gai_errors":{...},"lat_ms":{"p50":..,"p99":..,"max":..},"slow_1s":X,"slow_5s":Y,"first_failed":[...]}
 *
 * Usage: nq_lookup [-f first] [-n count] [-t threads] [-d deadline_s] [-D domain] [-T tag]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_FIRST_FAILED 8

enum outcome { OK, A_ONLY, AAAA_ONLY, WRONG, FAILED, N_OUTCOMES };

static int first, count = 100, nthreads = 4, deadline_s = 60;
static const char *domain = "pods.test";
static const char *tag = "lookups";
static double start_s;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int next_index, started;
static long outcomes[N_OUTCOMES];
static double *lat_ms;
static int n_lat;
static int gai_codes[32];
static int first_failed[MAX_FIRST_FAILED], n_first_failed;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static enum outcome check(int i, const struct addrinfo *res)
{
	struct in_addr want4;
	struct in6_addr want6;
	char text[64];
	int have4 = 0, have6 = 0, bad = 0;
	const struct addrinfo *ai;

	snprintf(text, sizeof(text), "100.64.%d.%d", (i >> 8) & 255, i & 255);
	inet_pton(AF_INET, text, &want4);
	snprintf(text, sizeof(text), "2001:db8:64::%x", i);
	inet_pton(AF_INET6, text, &want6);
	for (ai = res; ai; ai = ai->ai_next) {
		if (ai->ai_family == AF_INET &&
		    !memcmp(&((struct sockaddr_in *)ai->ai_addr)->sin_addr, &want4, sizeof(want4)))
			have4 = 1;
		else if (ai->ai_family == AF_INET6 &&
			 !memcmp(&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr, &want6, sizeof(want6)))
			have6 = 1;
		else
			bad = 1;
	}
	if (bad)
		return WRONG;
	if (have4 && have6)
		return OK;
	if (have4)
		return A_ONLY;
	if (have6)
		return AAAA_ONLY;
	return WRONG;
}

static void *worker(void *arg)
{
	(void)arg;
	for (;;) {
		struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_DGRAM };
		struct addrinfo *res = NULL;
		char name[256];
		double t0, ms;
		enum outcome o;
		int i, rc;

		pthread_mutex_lock(&lock);
		if (next_index >= count || now_s() - start_s > deadline_s) {
			pthread_mutex_unlock(&lock);
			return NULL;
		}
		i = first + next_index++;
		started++;
		pthread_mutex_unlock(&lock);

		snprintf(name, sizeof(name), "h%d.%s", i, domain);
		t0 = now_s();
		rc = getaddrinfo(name, NULL, &hints, &res);
		ms = (now_s() - t0) * 1000.0;
		o = rc ? FAILED : check(i, res);
		if (res)
			freeaddrinfo(res);

		pthread_mutex_lock(&lock);
		outcomes[o]++;
		lat_ms[n_lat++] = ms;
		if (rc)
			gai_codes[(-rc) & 31]++;
		if (o != OK && n_first_failed < MAX_FIRST_FAILED)
			first_failed[n_first_failed++] = i;
		pthread_mutex_unlock(&lock);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double pct(double p)
{
	int k;

	if (!n_lat)
		return 0;
	k = (int)(p * (n_lat - 1) + 0.5);
	return lat_ms[k];
}

int main(int argc, char **argv)
{
	pthread_t th[MAX_THREADS];
	long slow1 = 0, slow5 = 0;
	int opt, i;
	const char *sep = "";

	while ((opt = getopt(argc, argv, "f:n:t:d:D:T:")) != -1) {
		switch (opt) {
		case 'f':
			first = atoi(optarg);
			break;
		case 'n':
			count = atoi(optarg);
			break;
		case 't':
			nthreads = atoi(optarg);
			break;
		case 'd':
			deadline_s = atoi(optarg);
			break;
		case 'D':
			domain = optarg;
			break;
		case 'T':
			tag = optarg;
			break;
		default:
			fprintf(stderr, "usage: nq_lookup [-f first] [-n count] [-t threads] [-d deadline_s] [-D domain] [-T tag]\n");
			return 2;
		}
	}
	if (count < 1 || nthreads < 1 || nthreads > MAX_THREADS || first < 0) {
		fprintf(stderr, "nq_lookup: bad arguments\n");
		return 2;
	}
	lat_ms = calloc((size_t)count, sizeof(*lat_ms));
	if (!lat_ms)
		return 1;
	start_s = now_s();
	for (i = 0; i < nthreads; i++)
		pthread_create(&th[i], NULL, worker, NULL);
	for (i = 0; i < nthreads; i++)
		pthread_join(th[i], NULL);
	qsort(lat_ms, (size_t)n_lat, sizeof(*lat_ms), cmp_double);
	for (i = 0; i < n_lat; i++) {
		slow1 += lat_ms[i] >= 1000.0;
		slow5 += lat_ms[i] >= 4900.0;
	}
	printf("{\"type\":\"lookups\",\"tag\":\"%s\",\"planned\":%d,\"started\":%d,\"ok\":%ld,\"a_only\":%ld,"
	       "\"aaaa_only\":%ld,\"wrong\":%ld,\"failed\":%ld,\"seconds\":%.3f,\"gai_errors\":{",
	       tag, count, started, outcomes[OK], outcomes[A_ONLY], outcomes[AAAA_ONLY], outcomes[WRONG],
	       outcomes[FAILED], now_s() - start_s);
	for (i = 0; i < 32; i++) {
		if (gai_codes[i]) {
			printf("%s\"%s\":%d", sep, gai_strerror(-i), gai_codes[i]);
			sep = ",";
		}
	}
	printf("},\"lat_ms\":{\"p50\":%.2f,\"p99\":%.2f,\"max\":%.2f},\"slow_1s\":%ld,\"slow_5s\":%ld,\"first_failed\":[",
	       pct(0.5), pct(0.99), n_lat ? lat_ms[n_lat - 1] : 0.0, slow1, slow5);
	for (i = 0; i < n_first_failed; i++)
		printf("%s%d", i ? "," : "", first_failed[i]);
	printf("]}\n");
	return 0;
}
