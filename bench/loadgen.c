/*
 * loadgen: a Gearman load generator for atomnode's benchmarks.
 *
 * One thread, epoll, libc only. It speaks the Gearman binary protocol and the
 * text admin protocol itself, so it depends on none of the servers it measures.
 * Every run ends with one line `RESULT key=value ...` on stdout.
 * Exit codes: 0 ok, 1 protocol error or failed check, 2 timeout, 3 usage.
 *
 * Workloads (see bench/README.md for what each one means):
 *   submit-bg      C clients pipeline SUBMIT_JOB_BG, W in flight each
 *   drain          prefill N background jobs, then K workers empty the queue
 *   roundtrip      K workers + C clients doing foreground SUBMIT_JOB, W in flight
 *   grab-latency   idle pollers and busy workers time GRAB_JOB -> reply,
 *                  optionally while C clients submit (background or foreground) flat out
 *   depth          submit rate on an empty queue, then after it holds D jobs
 *   bg-latency     background jobs paced at --rate to idle AtoM-like workers:
 *                  submit sent -> JOB_ASSIGN received by a worker
 *   status         admin `status` (optionally waiting for the server to come up)
 *   freeport       print a free TCP port on 127.0.0.1 (never 4730)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Packet types, numbered as on the wire. */
enum {
    P_CAN_DO = 1, P_PRE_SLEEP = 4, P_NOOP = 6, P_SUBMIT_JOB = 7, P_JOB_CREATED = 8,
    P_GRAB_JOB = 9, P_NO_JOB = 10, P_JOB_ASSIGN = 11, P_WORK_STATUS = 12,
    P_WORK_COMPLETE = 13, P_WORK_FAIL = 14, P_SUBMIT_JOB_BG = 18, P_ERROR = 19,
    P_SUBMIT_JOB_HIGH = 21, P_WORK_EXCEPTION = 25, P_WORK_DATA = 28,
    P_WORK_WARNING = 29, P_GRAB_JOB_UNIQ = 30, P_JOB_ASSIGN_UNIQ = 31,
    P_SUBMIT_JOB_HIGH_BG = 32, P_SUBMIT_JOB_LOW = 33, P_SUBMIT_JOB_LOW_BG = 34,
};

#define HDR 12
#define MAX_BODY (64u * 1024 * 1024)
#define MAX_HANDLE 255
#define TAG_LEN 16

enum role { R_BG_CLIENT, R_FG_CLIENT, R_WORKER };
enum wstate { W_GRABBING, W_SLEEPING, W_TIMER };

typedef struct {
    char *p;
    size_t off, len, cap;
} buf_t;

typedef struct {
    uint64_t seq;
    uint64_t t0;
    int used;
    int hlen;
    char handle[MAX_HANDLE + 1];
} slot_t;

typedef struct conn {
    int fd;
    int role;
    int idx;
    int epout;
    buf_t in, out;
    /* clients: ring of sent-but-unacknowledged submits, in send order */
    uint64_t *q_seq, *q_t0;
    int q_head, q_count;
    slot_t *slots; /* foreground: created, waiting for WORK_COMPLETE */
    int inflight;
    uint64_t acked;
    /* workers */
    int wstate;
    int idle_poller;
    int unfenced;   /* sent WORK_COMPLETE, no NO_JOB seen since */
    int answered;   /* got at least one reply to a GRAB */
    uint64_t grab_t0;
    uint64_t next_grab;
    uint64_t sleeps;
    uint64_t done;
} conn_t;

typedef struct {
    uint32_t *v;
    size_t n, cap;
} vec_t;

static struct {
    const char *host, *port, *func, *label, *workload, *unique_prefix;
    int clients, workers, idle_workers, window, size, grab_uniq, priority;
    int no_prefill, wait, foreground;
    uint64_t jobs, depth;
    double timeout, duration, idle_interval, rate, poll;
    long long since_ns;
    long server_pid;
} opt = {
    .host = "127.0.0.1", .port = NULL, .func = "loadgen", .label = "",
    .clients = 4, .workers = 4, .idle_workers = 2, .window = 16, .size = 100,
    .grab_uniq = 1, .jobs = 100000, .timeout = 120, .duration = 5,
    .idle_interval = 0.001, .since_ns = -1,
};

static struct {
    int ep;
    conn_t **conns;
    int nconns;
    uint64_t t_start, deadline;
    uint64_t next_seq, submit_limit;
    uint64_t acked, completed, done;
    int record;          /* record submit latencies */
    int measure_grabs;   /* record GRAB_JOB latencies */
    vec_t lat, grab_idle, grab_busy, assign;
    uint64_t pace_t0;    /* --rate: job i is released at pace_t0 + i / rate */
    uint64_t *sent_ns;   /* bg-latency: when each job's submit was sent, by seq */
    uint8_t *seen;
    uint64_t seen_cap;
    uint64_t *hset;
    uint64_t hset_cap, hset_n;
    char prefix[64];
    uint64_t stray_noops;
} g;

/* ---------- small helpers ---------- */

static void fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void fail(int code, const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "loadgen: %s: ", code == 2 ? "TIMEOUT" : "ERROR");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(code);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        fail(1, "out of memory");
    return q;
}

static void *xcalloc(size_t n, size_t sz)
{
    void *q = calloc(n ? n : 1, sz ? sz : 1);
    if (!q)
        fail(1, "out of memory");
    return q;
}

static void vec_push(vec_t *v, uint64_t ns)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 4096;
        v->v = xrealloc(v->v, v->cap * sizeof *v->v);
    }
    uint64_t us = ns / 1000;
    v->v[v->n++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted vector. */
static uint32_t pct(const vec_t *v, double q)
{
    if (!v->n)
        return 0;
    size_t rank = (size_t)ceil(q * (double)v->n);
    if (rank < 1)
        rank = 1;
    if (rank > v->n)
        rank = v->n;
    return v->v[rank - 1];
}

static void print_lat(const char *prefix, vec_t *v)
{
    if (!v->n)
        return;
    qsort(v->v, v->n, sizeof *v->v, cmp_u32);
    printf(" %sp50_us=%u %sp90_us=%u %sp99_us=%u %smax_us=%u %ssamples=%zu", prefix, pct(v, .5),
           prefix, pct(v, .9), prefix, pct(v, .99), prefix, v->v[v->n - 1], prefix, v->n);
}

static long rss_kb(void)
{
    char path[64], line[256];
    long kb = -1;
    if (opt.server_pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%ld/status", opt.server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6))
            kb = strtol(line + 6, NULL, 10);
    fclose(f);
    return kb;
}

/* The server's CPU time (user + system, all threads) in microseconds; -1 without --pid. */
static double cpu_us(void)
{
    char path[64], buf[2048];
    if (opt.server_pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%ld/stat", opt.server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain spaces */
    unsigned long long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) * 1e6 / (double)sysconf(_SC_CLK_TCK);
}

static void print_cpu(double c0, uint64_t jobs)
{
    double c1 = cpu_us();
    if (c0 >= 0 && c1 >= 0 && jobs)
        printf(" server_cpu_s=%.2f cpu_us_per_job=%.1f", (c1 - c0) / 1e6, (c1 - c0) / (double)jobs);
}

/* Jobs already delivered to a worker: one byte per sequence number, grown on demand. */
static int seen_test_and_set(uint64_t seq)
{
    if (seq >= g.seen_cap) {
        uint64_t cap = g.seen_cap ? g.seen_cap : 65536;
        while (cap <= seq)
            cap *= 2;
        g.seen = xrealloc(g.seen, cap);
        memset(g.seen + g.seen_cap, 0, cap - g.seen_cap);
        g.seen_cap = cap;
    }
    int was = g.seen[seq];
    g.seen[seq] = 1;
    return was;
}

static uint64_t fnv1a(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 1099511628211ull;
    }
    return h | 1; /* 0 marks an empty slot */
}

/* Set of 64-bit handle hashes; returns 1 if it was already there. */
static int hset_add(uint64_t h)
{
    if ((g.hset_n + 1) * 2 > g.hset_cap) {
        uint64_t ncap = g.hset_cap ? g.hset_cap * 2 : 1 << 16;
        uint64_t *n = xcalloc(ncap, sizeof *n);
        for (uint64_t i = 0; i < g.hset_cap; i++) {
            if (!g.hset[i])
                continue;
            uint64_t j = g.hset[i] & (ncap - 1);
            while (n[j])
                j = (j + 1) & (ncap - 1);
            n[j] = g.hset[i];
        }
        free(g.hset);
        g.hset = n;
        g.hset_cap = ncap;
    }
    uint64_t j = h & (g.hset_cap - 1);
    while (g.hset[j]) {
        if (g.hset[j] == h)
            return 1;
        j = (j + 1) & (g.hset_cap - 1);
    }
    g.hset[j] = h;
    g.hset_n++;
    return 0;
}

/* ---------- payloads ---------- */

static void tag_of(uint64_t seq, char out[TAG_LEN])
{
    static const char hex[] = "0123456789abcdef";
    for (int i = TAG_LEN - 1; i >= 0; i--) {
        out[i] = hex[seq & 15];
        seq >>= 4;
    }
}

static int parse_tag(const char *p, size_t n, uint64_t *seq)
{
    uint64_t v = 0;
    if (n < TAG_LEN)
        return -1;
    for (int i = 0; i < TAG_LEN; i++) {
        char c = p[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else
            return -1;
        v = (v << 4) | (uint64_t)d;
    }
    *seq = v;
    return 0;
}

static char pattern_byte(uint64_t seq, size_t i)
{
    return (char)('A' + (int)((seq * 7 + i) % 26));
}

static int unique_of(uint64_t seq, char *out, size_t cap)
{
    return snprintf(out, cap, "%s-%llu", g.prefix, (unsigned long long)seq);
}

/* ---------- buffers and packets ---------- */

static void buf_reserve(buf_t *b, size_t extra)
{
    if (b->off && b->off == b->len)
        b->off = b->len = 0;
    if (b->len + extra <= b->cap)
        return;
    if (b->off) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap)
            return;
    }
    size_t cap = b->cap ? b->cap : 16384;
    while (cap < b->len + extra)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void put_u32(char *p, uint32_t v)
{
    v = htonl(v);
    memcpy(p, &v, 4);
}

static uint32_t get_u32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return ntohl(v);
}

/* Append a request packet made of n arguments (NUL-separated, the last raw). */
static void put_packet(conn_t *c, uint32_t type, int n, const char *const *arg, const size_t *len)
{
    size_t body = 0;
    for (int i = 0; i < n; i++)
        body += len[i] + (i < n - 1);
    buf_reserve(&c->out, HDR + body);
    char *p = c->out.p + c->out.len;
    memcpy(p, "\0REQ", 4);
    put_u32(p + 4, type);
    put_u32(p + 8, (uint32_t)body);
    p += HDR;
    for (int i = 0; i < n; i++) {
        memcpy(p, arg[i], len[i]);
        p += len[i];
        if (i < n - 1)
            *p++ = '\0';
    }
    c->out.len += HDR + body;
}

static void put_packet0(conn_t *c, uint32_t type)
{
    put_packet(c, type, 0, NULL, NULL);
}

static void ep_mod(conn_t *c, int want_out)
{
    if (c->epout == want_out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(g.ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        fail(1, "epoll_ctl: %s", strerror(errno));
    c->epout = want_out;
}

static void flush_out(conn_t *c)
{
    while (c->out.len > c->out.off) {
        ssize_t w = write(c->fd, c->out.p + c->out.off, c->out.len - c->out.off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            fail(1, "write to server (conn %d): %s", c->idx, strerror(errno));
        }
        c->out.off += (size_t)w;
    }
    if (c->out.off == c->out.len)
        c->out.off = c->out.len = 0;
    ep_mod(c, c->out.len > c->out.off);
}

/* Split a body into exactly n arguments: the first n-1 end at a NUL, the last is raw. */
static int split_args(const char *body, size_t size, int n, const char **arg, size_t *len)
{
    size_t pos = 0;
    for (int i = 0; i < n - 1; i++) {
        const char *z = memchr(body + pos, '\0', size - pos);
        if (!z)
            return -1;
        arg[i] = body + pos;
        len[i] = (size_t)(z - (body + pos));
        pos += len[i] + 1;
    }
    arg[n - 1] = body + pos;
    len[n - 1] = size - pos;
    return 0;
}

/* ---------- connections ---------- */

static int connect_once(int *err)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai, *a;
    int rc = getaddrinfo(opt.host, opt.port, &hints, &ai);
    if (rc)
        fail(3, "cannot resolve %s:%s: %s", opt.host, opt.port, gai_strerror(rc));
    int fd = -1;
    *err = 0;
    for (a = ai; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        *err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

static conn_t *conn_new(int role)
{
    int err;
    int fd = connect_once(&err);
    if (fd < 0)
        fail(1, "connect to %s:%s: %s", opt.host, opt.port, strerror(err));
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    conn_t *c = xcalloc(1, sizeof *c);
    c->fd = fd;
    c->role = role;
    c->idx = g.nconns;
    if (role != R_WORKER) {
        c->q_seq = xcalloc((size_t)opt.window, sizeof *c->q_seq);
        c->q_t0 = xcalloc((size_t)opt.window, sizeof *c->q_t0);
        if (role == R_FG_CLIENT)
            c->slots = xcalloc((size_t)opt.window, sizeof *c->slots);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(g.ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        fail(1, "epoll_ctl: %s", strerror(errno));
    g.conns = xrealloc(g.conns, (size_t)(g.nconns + 1) * sizeof *g.conns);
    g.conns[g.nconns++] = c;
    return c;
}

/* ---------- clients ---------- */

static uint32_t submit_type(int background)
{
    static const uint32_t t[2][3] = {
        {P_SUBMIT_JOB, P_SUBMIT_JOB_HIGH, P_SUBMIT_JOB_LOW},
        {P_SUBMIT_JOB_BG, P_SUBMIT_JOB_HIGH_BG, P_SUBMIT_JOB_LOW_BG},
    };
    return t[background][opt.priority];
}

/* --rate: how many jobs (from seq 0) may have been submitted by time t. */
static uint64_t paced_released(uint64_t t)
{
    if (t < g.pace_t0)
        return 0;
    return (uint64_t)((double)(t - g.pace_t0) * opt.rate / 1e9) + 1;
}

static uint64_t paced_time(uint64_t seq)
{
    return g.pace_t0 + (uint64_t)((double)seq * 1e9 / opt.rate);
}

static void client_refill(conn_t *c)
{
    static char *data;
    if (!data)
        data = xcalloc((size_t)opt.size, 1);
    uint64_t limit = g.submit_limit;
    if (opt.rate > 0) {
        uint64_t released = paced_released(now_ns());
        if (released < limit)
            limit = released;
    }
    while (c->inflight < opt.window && g.next_seq < limit) {
        uint64_t seq = g.next_seq++;
        char uniq[96];
        int ulen = unique_of(seq, uniq, sizeof uniq);
        tag_of(seq, data);
        for (size_t i = TAG_LEN; i < (size_t)opt.size; i++)
            data[i] = pattern_byte(seq, i);
        const char *arg[3] = {opt.func, uniq, data};
        size_t len[3] = {strlen(opt.func), (size_t)ulen, (size_t)opt.size};
        put_packet(c, submit_type(c->role == R_BG_CLIENT), 3, arg, len);
        int tail = (c->q_head + c->q_count) % opt.window;
        c->q_seq[tail] = seq;
        c->q_t0[tail] = now_ns();
        if (g.sent_ns)
            g.sent_ns[seq] = c->q_t0[tail];
        c->q_count++;
        c->inflight++;
    }
}

static void check_handle(const char *h, size_t n)
{
    if (n == 0 || n > MAX_HANDLE || memchr(h, '\0', n))
        fail(1, "bad job handle (length %zu)", n);
}

static void on_client_packet(conn_t *c, uint32_t type, const char *body, size_t size, uint64_t t)
{
    const char *arg[2];
    size_t len[2];
    if (type == P_JOB_CREATED) {
        if (!c->q_count)
            fail(1, "JOB_CREATED with no submit outstanding (conn %d)", c->idx);
        check_handle(body, size);
        uint64_t seq = c->q_seq[c->q_head], t0 = c->q_t0[c->q_head];
        c->q_head = (c->q_head + 1) % opt.window;
        c->q_count--;
        if (c->role == R_BG_CLIENT) {
            if (hset_add(fnv1a(body, size)))
                fail(1, "handle %.*s given to two jobs", (int)size, body);
            c->inflight--;
            c->acked++;
            g.acked++;
            if (g.record)
                vec_push(&g.lat, t - t0);
            return;
        }
        for (int i = 0; i < opt.window; i++) {
            slot_t *s = &c->slots[i];
            if (s->used && s->hlen == (int)size && !memcmp(s->handle, body, size))
                fail(1, "handle %.*s given to two pending jobs", (int)size, body);
        }
        for (int i = 0; i < opt.window; i++) {
            slot_t *s = &c->slots[i];
            if (s->used)
                continue;
            s->used = 1;
            s->seq = seq;
            s->t0 = t0;
            s->hlen = (int)size;
            memcpy(s->handle, body, size);
            return;
        }
        fail(1, "internal: no free slot");
    }
    if (type == P_WORK_COMPLETE && c->role == R_FG_CLIENT) {
        if (split_args(body, size, 2, arg, len))
            fail(1, "malformed WORK_COMPLETE");
        for (int i = 0; i < opt.window; i++) {
            slot_t *s = &c->slots[i];
            if (!s->used || s->hlen != (int)len[0] || memcmp(s->handle, arg[0], len[0]))
                continue;
            char tag[TAG_LEN];
            tag_of(s->seq, tag);
            if (len[1] != TAG_LEN || memcmp(arg[1], tag, TAG_LEN))
                fail(1, "WORK_COMPLETE for job %llu carries the wrong result",
                     (unsigned long long)s->seq);
            s->used = 0;
            c->inflight--;
            c->acked++;
            g.completed++;
            if (g.record)
                vec_push(&g.lat, t - s->t0);
            return;
        }
        fail(1, "WORK_COMPLETE for unknown handle %.*s", (int)len[0], arg[0]);
    }
    switch (type) {
    case P_WORK_FAIL:
        fail(1, "WORK_FAIL received by a client");
    case P_WORK_EXCEPTION:
        fail(1, "WORK_EXCEPTION received by a client");
    case P_WORK_DATA:
    case P_WORK_WARNING:
    case P_WORK_STATUS:
        fail(1, "unexpected WORK_DATA/WARNING/STATUS (type %u) at a client", type);
    default:
        fail(1, "unexpected packet type %u at a client", type);
    }
}

/* ---------- workers ---------- */

static void worker_grab(conn_t *c, uint64_t t)
{
    put_packet0(c, opt.grab_uniq && !c->idle_poller ? P_GRAB_JOB_UNIQ : P_GRAB_JOB);
    c->wstate = W_GRABBING;
    c->grab_t0 = t;
}

static void worker_start(conn_t *c, const char *func)
{
    char id[48];
    int n = snprintf(id, sizeof id, "loadgen-%d", c->idx);
    const char *a[1] = {id};
    size_t l[1] = {(size_t)n};
    put_packet(c, 22 /* SET_CLIENT_ID */, 1, a, l);
    a[0] = func;
    l[0] = strlen(func);
    put_packet(c, P_CAN_DO, 1, a, l);
    worker_grab(c, now_ns());
}

static void check_job(const char *func, size_t flen, const char *uniq, size_t ulen,
                      const char *data, size_t dlen, uint64_t *seq_out)
{
    uint64_t seq;
    if (flen != strlen(opt.func) || memcmp(func, opt.func, flen))
        fail(1, "job for function %.*s, expected %s", (int)flen, func, opt.func);
    if (dlen != (size_t)opt.size || parse_tag(data, dlen, &seq))
        fail(1, "job payload of %zu bytes is not ours", dlen);
    for (size_t i = TAG_LEN; i < dlen; i++)
        if (data[i] != pattern_byte(seq, i))
            fail(1, "job %llu payload corrupted at byte %zu", (unsigned long long)seq, i);
    if (seq >= g.submit_limit)
        fail(1, "job %llu was never submitted", (unsigned long long)seq);
    if (uniq) {
        char want[96];
        int n = unique_of(seq, want, sizeof want);
        if (ulen != (size_t)n || memcmp(uniq, want, ulen))
            fail(1, "job %llu has unique %.*s, expected %s", (unsigned long long)seq,
                 (int)ulen, uniq, want);
    }
    if (seen_test_and_set(seq))
        fail(1, "job %llu delivered twice", (unsigned long long)seq);
    *seq_out = seq;
}

static void on_worker_packet(conn_t *c, uint32_t type, const char *body, size_t size, uint64_t t)
{
    const char *arg[4];
    size_t len[4];
    if ((type == P_JOB_ASSIGN || type == P_JOB_ASSIGN_UNIQ || type == P_NO_JOB) &&
        c->wstate != W_GRABBING)
        fail(1, "reply type %u to a GRAB that was not sent (worker %d)", type, c->idx);
    if (type == P_JOB_ASSIGN || type == P_JOB_ASSIGN_UNIQ || type == P_NO_JOB) {
        if (g.measure_grabs)
            vec_push(c->idle_poller ? &g.grab_idle : &g.grab_busy, t - c->grab_t0);
        c->answered = 1;
    }
    switch (type) {
    case P_JOB_ASSIGN:
    case P_JOB_ASSIGN_UNIQ: {
        int uniq = type == P_JOB_ASSIGN_UNIQ;
        uint64_t seq;
        if (c->idle_poller)
            fail(1, "idle poller was given a job");
        if (uniq != (opt.grab_uniq && !c->idle_poller))
            fail(1, "JOB_ASSIGN%s in reply to the other GRAB type", uniq ? "_UNIQ" : "");
        if (split_args(body, size, uniq ? 4 : 3, arg, len))
            fail(1, "malformed JOB_ASSIGN");
        check_handle(arg[0], len[0]);
        if (uniq)
            check_job(arg[1], len[1], arg[2], len[2], arg[3], len[3], &seq);
        else
            check_job(arg[1], len[1], NULL, 0, arg[2], len[2], &seq);
        if (g.sent_ns)
            vec_push(&g.assign, t - g.sent_ns[seq]);
        char tag[TAG_LEN];
        tag_of(seq, tag);
        const char *a[2] = {arg[0], tag};
        size_t l[2] = {len[0], TAG_LEN};
        put_packet(c, P_WORK_COMPLETE, 2, a, l);
        c->done++;
        g.done++;
        c->unfenced = 1;
        worker_grab(c, t);
        return;
    }
    case P_NO_JOB:
        c->unfenced = 0;
        put_packet0(c, P_PRE_SLEEP);
        if (c->idle_poller) {
            c->wstate = W_TIMER;
            c->next_grab = t + (uint64_t)(opt.idle_interval * 1e9);
        } else {
            c->wstate = W_SLEEPING;
            c->sleeps++;
            if (opt.poll > 0) /* AtoM's worker grabs again after ~1 s without a NOOP */
                c->next_grab = t + (uint64_t)(opt.poll * 1e9);
        }
        return;
    case P_NOOP:
        if (c->wstate == W_SLEEPING)
            worker_grab(c, t);
        else
            g.stray_noops++;
        return;
    case P_WORK_FAIL:
    case P_WORK_EXCEPTION:
        fail(1, "type %u received by a worker", type);
    default:
        fail(1, "unexpected packet type %u at a worker", type);
    }
}

/* ---------- the event loop ---------- */

static void on_packet(conn_t *c, uint32_t type, const char *body, size_t size, uint64_t t)
{
    if (type == P_ERROR) {
        const char *arg[2];
        size_t len[2];
        if (split_args(body, size, 2, arg, len))
            fail(1, "ERROR packet (malformed) on conn %d", c->idx);
        fail(1, "server sent ERROR %.*s: %.*s (conn %d)", (int)len[0], arg[0], (int)len[1],
             arg[1], c->idx);
    }
    if (c->role == R_WORKER)
        on_worker_packet(c, type, body, size, t);
    else
        on_client_packet(c, type, body, size, t);
}

static void on_readable(conn_t *c)
{
    for (;;) {
        buf_reserve(&c->in, 65536);
        ssize_t r = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            fail(1, "read from server (conn %d): %s", c->idx, strerror(errno));
        }
        if (r == 0)
            fail(1, "server closed connection %d", c->idx);
        c->in.len += (size_t)r;
        if ((size_t)r < c->in.cap - c->in.len + (size_t)r)
            break; /* short read: the socket is empty */
    }
    uint64_t t = now_ns();
    while (c->in.len - c->in.off >= HDR) {
        const char *h = c->in.p + c->in.off;
        if (memcmp(h, "\0RES", 4))
            fail(1, "bad response magic on conn %d", c->idx);
        uint32_t type = get_u32(h + 4), size = get_u32(h + 8);
        if (size > MAX_BODY)
            fail(1, "response of %u bytes", size);
        if (c->in.len - c->in.off < HDR + (size_t)size)
            break;
        c->in.off += HDR + size;
        on_packet(c, type, h + HDR, size, t);
    }
    if (c->role != R_WORKER)
        client_refill(c);
    flush_out(c);
}

static void kick_clients(void);

/* Run the loop until done() is true; timers drive idle pollers; stop at *until if given. */
static void run_until(int (*done)(void), uint64_t until)
{
    struct epoll_event ev[64];
    for (;;) {
        if (done && done())
            return;
        uint64_t t = now_ns();
        if (until && t >= until)
            return;
        if (t >= g.deadline)
            fail(2, "no completion within %.0f s (acked %llu, completed %llu, done %llu)",
                 opt.timeout, (unsigned long long)g.acked, (unsigned long long)g.completed,
                 (unsigned long long)g.done);
        uint64_t wake = g.deadline;
        if (until && until < wake)
            wake = until;
        if (opt.rate > 0 && g.next_seq < g.submit_limit) {
            uint64_t r = paced_time(g.next_seq);
            if (r <= t)
                kick_clients();
            else if (r < wake)
                wake = r;
        }
        for (int i = 0; i < g.nconns; i++) {
            conn_t *c = g.conns[i];
            if (c->role != R_WORKER ||
                !(c->wstate == W_TIMER || (c->wstate == W_SLEEPING && opt.poll > 0)))
                continue;
            if (c->next_grab <= t) {
                worker_grab(c, t);
                flush_out(c);
            } else if (c->next_grab < wake) {
                wake = c->next_grab;
            }
        }
        int ms = (int)((wake - t + 999999) / 1000000);
        int n = epoll_wait(g.ep, ev, 64, ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail(1, "epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = ev[i].data.ptr;
            if (ev[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
            if (ev[i].events & EPOLLOUT)
                flush_out(c);
        }
    }
}

static uint64_t want;
static int all_acked(void) { return g.acked >= want; }
static int all_completed(void) { return g.completed >= want; }

static int workers_answered(void)
{
    for (int i = 0; i < g.nconns; i++)
        if (g.conns[i]->role == R_WORKER && !g.conns[i]->answered)
            return 0;
    return 1;
}

/* Drain fence: every job done, and every worker got NO_JOB after its last WORK_COMPLETE. */
static int drained(void)
{
    if (g.done < want)
        return 0;
    for (int i = 0; i < g.nconns; i++)
        if (g.conns[i]->role == R_WORKER && g.conns[i]->unfenced)
            return 0;
    return 1;
}

static void kick_clients(void)
{
    for (int i = 0; i < g.nconns; i++)
        if (g.conns[i]->role != R_WORKER) {
            client_refill(g.conns[i]);
            flush_out(g.conns[i]);
        }
}

static void conn_stats(uint64_t *mn, uint64_t *mx)
{
    *mn = UINT64_MAX;
    *mx = 0;
    for (int i = 0; i < g.nconns; i++) {
        conn_t *c = g.conns[i];
        if (c->role == R_WORKER)
            continue;
        if (c->acked < *mn)
            *mn = c->acked;
        if (c->acked > *mx)
            *mx = c->acked;
    }
    if (*mn == UINT64_MAX)
        *mn = 0;
}

static uint64_t worker_sleeps(void)
{
    uint64_t s = 0;
    for (int i = 0; i < g.nconns; i++)
        if (g.conns[i]->role == R_WORKER)
            s += g.conns[i]->sleeps;
    return s;
}

static void result_head(const char *workload, uint64_t jobs, int clients, int workers,
                        double secs, double rate)
{
    printf("RESULT workload=%s label=%s jobs=%llu clients=%d workers=%d window=%d size=%d "
           "seconds=%.4f jobs_per_s=%.0f",
           workload, *opt.label ? opt.label : workload, (unsigned long long)jobs, clients,
           workers, opt.window, opt.size, secs, rate);
}

static double secs_since(uint64_t t0) { return (double)(now_ns() - t0) / 1e9; }

/* Submit background jobs [from, to) over the client connections; returns seconds taken. */
static double submit_phase(uint64_t from, uint64_t to)
{
    g.next_seq = from;
    g.submit_limit = to;
    want = to;
    uint64_t t0 = now_ns();
    kick_clients();
    run_until(all_acked, 0);
    return secs_since(t0);
}

static void open_clients(int role, int n)
{
    for (int i = 0; i < n; i++)
        conn_new(role);
}

/* ---------- workloads ---------- */

static int wl_submit_bg(void)
{
    open_clients(R_BG_CLIENT, opt.clients);
    long rss0 = rss_kb();
    double c0 = cpu_us();
    g.record = 1;
    double s = submit_phase(0, opt.jobs);
    long rss1 = rss_kb();
    uint64_t mn, mx;
    conn_stats(&mn, &mx);
    result_head("submit-bg", opt.jobs, opt.clients, 0, s, (double)opt.jobs / s);
    print_lat("", &g.lat);
    printf(" conn_jobs_min=%llu conn_jobs_max=%llu", (unsigned long long)mn,
           (unsigned long long)mx);
    if (rss0 >= 0 && rss1 >= 0)
        printf(" rss_start_kb=%ld rss_end_kb=%ld bytes_per_job=%.0f", rss0, rss1,
               (double)(rss1 - rss0) * 1024.0 / (double)opt.jobs);
    print_cpu(c0, opt.jobs);
    printf("\n");
    return 0;
}

static int wl_drain(void)
{
    double prefill_rate = 0;
    if (!opt.no_prefill) {
        open_clients(R_BG_CLIENT, opt.clients);
        double s = submit_phase(0, opt.jobs);
        prefill_rate = (double)opt.jobs / s;
    }
    g.submit_limit = opt.jobs; /* workers accept only seq < jobs */
    want = opt.jobs;
    for (int i = 0; i < opt.workers; i++)
        conn_new(R_WORKER);
    double c0 = cpu_us();
    uint64_t t0 = now_ns();
    for (int i = 0; i < g.nconns; i++)
        if (g.conns[i]->role == R_WORKER) {
            worker_start(g.conns[i], opt.func);
            flush_out(g.conns[i]);
        }
    run_until(drained, 0);
    double s = secs_since(t0);
    result_head("drain", opt.jobs, opt.no_prefill ? 0 : opt.clients, opt.workers, s,
                (double)opt.jobs / s);
    printf(" worker_sleeps=%llu", (unsigned long long)worker_sleeps());
    if (!opt.no_prefill)
        printf(" prefill_jobs_per_s=%.0f", prefill_rate);
    print_cpu(c0, opt.jobs);
    printf("\n");
    return 0;
}

static int wl_roundtrip(void)
{
    for (int i = 0; i < opt.workers; i++) {
        conn_t *w = conn_new(R_WORKER);
        worker_start(w, opt.func);
        flush_out(w);
    }
    /* Every worker has been told NO_JOB, so the server knows its CAN_DO. */
    run_until(workers_answered, 0);
    open_clients(R_FG_CLIENT, opt.clients);
    g.record = 1;
    g.next_seq = 0;
    g.submit_limit = opt.jobs;
    want = opt.jobs;
    double c0 = cpu_us();
    uint64_t t0 = now_ns();
    kick_clients();
    run_until(all_completed, 0);
    double s = secs_since(t0);
    if (g.done != opt.jobs)
        fail(1, "workers did %llu jobs, clients saw %llu", (unsigned long long)g.done,
             (unsigned long long)opt.jobs);
    uint64_t mn, mx;
    conn_stats(&mn, &mx);
    result_head("roundtrip", opt.jobs, opt.clients, opt.workers, s, (double)opt.jobs / s);
    print_lat("", &g.lat);
    printf(" worker_sleeps=%llu conn_jobs_min=%llu conn_jobs_max=%llu",
           (unsigned long long)worker_sleeps(), (unsigned long long)mn, (unsigned long long)mx);
    print_cpu(c0, opt.jobs);
    printf("\n");
    return 0;
}

static int wl_grab_latency(void)
{
    char idle_func[600];
    snprintf(idle_func, sizeof idle_func, "%s-idle", opt.func);
    for (int i = 0; i < opt.idle_workers; i++) {
        conn_t *w = conn_new(R_WORKER);
        w->idle_poller = 1;
        worker_start(w, idle_func);
        flush_out(w);
    }
    for (int i = 0; i < opt.workers; i++) {
        conn_t *w = conn_new(R_WORKER);
        worker_start(w, opt.func);
        flush_out(w);
    }
    g.submit_limit = UINT64_MAX;
    run_until(workers_answered, 0);
    open_clients(opt.foreground ? R_FG_CLIENT : R_BG_CLIENT, opt.clients);
    g.measure_grabs = 1;
    g.record = 1;
    g.next_seq = 0;
    double c0 = cpu_us();
    uint64_t t0 = now_ns();
    kick_clients();
    run_until(NULL, t0 + (uint64_t)(opt.duration * 1e9));
    double s = secs_since(t0);
    uint64_t submitted = opt.foreground ? g.completed : g.acked;
    result_head("grab-latency", submitted, opt.clients, opt.workers, s, (double)submitted / s);
    printf(" foreground=%d", opt.foreground);
    printf(" idle_workers=%d done=%llu done_per_s=%.0f", opt.idle_workers,
           (unsigned long long)g.done, (double)g.done / s);
    vec_t all = {0};
    for (size_t i = 0; i < g.grab_idle.n; i++)
        vec_push(&all, (uint64_t)g.grab_idle.v[i] * 1000);
    for (size_t i = 0; i < g.grab_busy.n; i++)
        vec_push(&all, (uint64_t)g.grab_busy.v[i] * 1000);
    print_lat("grab_", &all);
    print_lat("idle_", &g.grab_idle);
    print_lat("busy_", &g.grab_busy);
    print_lat("submit_", &g.lat);
    printf(" worker_sleeps=%llu", (unsigned long long)worker_sleeps());
    print_cpu(c0, submitted);
    printf("\n");
    if (!all.n)
        fail(1, "no GRAB_JOB was answered during the run");
    return 0;
}

static int wl_depth(void)
{
    uint64_t n = opt.jobs, d = opt.depth;
    if (d < n)
        fail(3, "--depth (%llu) must be at least --jobs (%llu)", (unsigned long long)d,
             (unsigned long long)n);
    open_clients(R_BG_CLIENT, opt.clients);
    long rss0 = rss_kb();
    double s_empty = submit_phase(0, n);
    double s_fill = d > n ? submit_phase(n, d) : 0;
    long rss_mid = rss_kb();
    g.record = 1;
    double c0 = cpu_us();
    double s_deep = submit_phase(d, d + n);
    double c1 = cpu_us();
    long rss1 = rss_kb();
    double empty = (double)n / s_empty, deep = (double)n / s_deep;
    result_head("depth", n, opt.clients, 0, s_deep, deep);
    printf(" depth=%llu empty_jobs_per_s=%.0f ratio=%.3f", (unsigned long long)d, empty,
           deep / empty);
    if (d > n)
        printf(" fill_jobs_per_s=%.0f", (double)(d - n) / s_fill);
    print_lat("", &g.lat);
    if (rss0 >= 0 && rss1 >= 0)
        printf(" rss_start_kb=%ld rss_depth_kb=%ld rss_end_kb=%ld queued=%llu bytes_per_job=%.0f",
               rss0, rss_mid, rss1, (unsigned long long)(d + n),
               (double)(rss1 - rss0) * 1024.0 / (double)(d + n));
    if (c0 >= 0 && c1 >= 0)
        printf(" server_cpu_s=%.2f cpu_us_per_job=%.1f", (c1 - c0) / 1e6, (c1 - c0) / (double)n);
    printf("\n");
    return 0;
}

/* Background jobs released at --rate (total submits/s, spread over the clients) to K
 * AtoM-like workers: plain GRAB_JOB, PRE_SLEEP when told NO_JOB, wake on NOOP (and, with
 * --poll S, grab again after S seconds without one). Measures submit sent -> JOB_ASSIGN
 * at a worker (assign_), and submit -> JOB_CREATED (submit_); ends at the drain fence. */
static int wl_bg_latency(void)
{
    if (opt.rate <= 0)
        fail(3, "bg-latency needs --rate R (> 0)");
    g.sent_ns = xcalloc(opt.jobs, sizeof *g.sent_ns);
    g.submit_limit = opt.jobs;
    for (int i = 0; i < opt.workers; i++) {
        conn_t *w = conn_new(R_WORKER);
        worker_start(w, opt.func);
        flush_out(w);
    }
    /* Every worker has been told NO_JOB and sleeps: the jobs meet idle workers. */
    run_until(workers_answered, 0);
    open_clients(R_BG_CLIENT, opt.clients);
    g.record = 1;
    g.next_seq = 0;
    want = opt.jobs;
    double c0 = cpu_us();
    uint64_t t0 = now_ns();
    g.pace_t0 = t0;
    kick_clients();
    run_until(drained, 0);
    double s = secs_since(t0);
    if (g.acked != opt.jobs)
        fail(1, "%llu of %llu submits acknowledged", (unsigned long long)g.acked,
             (unsigned long long)opt.jobs);
    result_head("bg-latency", opt.jobs, opt.clients, opt.workers, s, (double)opt.jobs / s);
    printf(" rate=%.0f", opt.rate);
    print_lat("assign_", &g.assign);
    print_lat("submit_", &g.lat);
    printf(" worker_sleeps=%llu", (unsigned long long)worker_sleeps());
    print_cpu(c0, opt.jobs);
    printf("\n");
    return 0;
}

/* Admin `status`: with --wait, retry the connection until the server answers. */
static int wl_status(void)
{
    struct timespec rt;
    int fd, err = 0;
    uint64_t t0 = now_ns();
    for (;;) {
        fd = connect_once(&err);
        if (fd >= 0)
            break;
        if (!opt.wait)
            fail(1, "connect to %s:%s: %s", opt.host, opt.port, strerror(err));
        if (now_ns() >= g.deadline)
            fail(2, "server not accepting connections after %.0f s: %s", opt.timeout,
                 strerror(err));
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    double left = (double)(g.deadline - now_ns()) / 1e9;
    if (left < 0.001)
        left = 0.001;
    struct timeval tv = {.tv_sec = (time_t)left, .tv_usec = (suseconds_t)((left - (double)(time_t)left) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (write(fd, "status\n", 7) != 7)
        fail(1, "write status: %s", strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = xcalloc(cap, 1);
    for (;;) {
        if (len + 1 >= cap)
            buf = xrealloc(buf, cap *= 2);
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            fail(2, "no complete status reply within %.0f s", opt.timeout);
        if (r <= 0)
            fail(1, "status reply cut short: %s", r ? strerror(errno) : "connection closed");
        len += (size_t)r;
        buf[len] = 0;
        if ((len >= 2 && !strcmp(buf, ".\n")) || (len >= 3 && !strcmp(buf + len - 3, "\n.\n")))
            break;
        if (!strncmp(buf, "ERR", 3) && memchr(buf, '\n', len))
            fail(1, "status answered %s", buf);
    }
    close(fd);
    double secs;
    if (opt.since_ns >= 0) {
        clock_gettime(CLOCK_REALTIME, &rt);
        secs = ((double)rt.tv_sec * 1e9 + (double)rt.tv_nsec - (double)opt.since_ns) / 1e9;
    } else {
        secs = secs_since(t0);
    }
    unsigned long long total = 0, running = 0, workers = 0, nfunc = 0, found = 0;
    for (char *line = buf; *line && strcmp(line, ".\n");) {
        char *nl = strchr(line, '\n');
        *nl = 0;
        char *f[4];
        int k = 0;
        for (char *p = line; k < 4; k++) {
            f[k] = p;
            char *tab = strchr(p, '\t');
            if (!tab) {
                k++;
                break;
            }
            *tab = 0;
            p = tab + 1;
        }
        if (k != 4)
            fail(1, "status line is not FUNC\\tTOTAL\\tRUNNING\\tWORKERS: %s", line);
        char *e1, *e2, *e3;
        unsigned long long a = strtoull(f[1], &e1, 10), b = strtoull(f[2], &e2, 10),
                           w = strtoull(f[3], &e3, 10);
        if (*e1 || *e2 || *e3 || !*f[1] || !*f[2] || !*f[3])
            fail(1, "status line with non-numeric fields: %s", f[0]);
        nfunc++;
        if (!opt.func || !*opt.func || !strcmp(f[0], opt.func)) {
            found++;
            total += a;
            running += b;
            workers += w;
        }
        line = nl + 1;
    }
    printf("RESULT workload=status label=%s seconds=%.4f functions=%llu found=%llu total=%llu "
           "running=%llu workers=%llu\n",
           *opt.label ? opt.label : "status", secs, nfunc, found, total, running, workers);
    return 0;
}

static int wl_freeport(void)
{
    for (int tries = 0; tries < 20; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t al = sizeof a;
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) ||
            getsockname(fd, (struct sockaddr *)&a, &al))
            fail(1, "cannot bind a free port: %s", strerror(errno));
        close(fd);
        if (ntohs(a.sin_port) != 4730) {
            printf("%u\n", ntohs(a.sin_port));
            return 0;
        }
    }
    fail(1, "no free port");
}

/* ---------- main ---------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen WORKLOAD [options]\n"
            "  workloads: submit-bg drain roundtrip grab-latency depth bg-latency\n"
            "             status freeport\n"
            "  -H/--host H (127.0.0.1)  -p/--port P (required)  -c/--clients C (4)\n"
            "  -k/--workers K (4)  -n/--jobs N (100000)  -w/--window W (16)\n"
            "  -s/--size BYTES (100, >= 16)  -f/--func NAME (loadgen)  -t/--timeout S (120)\n"
            "  --label TEXT  --priority normal|high|low  --grab uniq|plain  --no-prefill\n"
            "  --unique-prefix S  --pid SERVER_PID (report its RSS)\n"
            "  grab-latency: --duration S (5) --idle-workers I (2) --idle-interval S (0.001)\n"
            "                --foreground (clients submit SUBMIT_JOB instead of SUBMIT_JOB_BG)\n"
            "  depth: --depth D (jobs queued before the measured batch of N)\n"
            "  bg-latency: --rate R (total submits/s, required) --poll S (0: wait for NOOP)\n"
            "  status: --wait (retry until the server answers) --since-ns REALTIME_NS\n");
    exit(3);
}

static double parse_double(const char *s, const char *what)
{
    char *e;
    double v = strtod(s, &e);
    if (*e || v < 0)
        fail(3, "bad value for %s: %s", what, s);
    return v;
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"host", 1, 0, 'H'},         {"port", 1, 0, 'p'},         {"clients", 1, 0, 'c'},
        {"workers", 1, 0, 'k'},      {"jobs", 1, 0, 'n'},         {"window", 1, 0, 'w'},
        {"size", 1, 0, 's'},         {"func", 1, 0, 'f'},         {"timeout", 1, 0, 't'},
        {"label", 1, 0, 1},          {"priority", 1, 0, 2},       {"grab", 1, 0, 3},
        {"no-prefill", 0, 0, 4},     {"unique-prefix", 1, 0, 5},  {"pid", 1, 0, 6},
        {"duration", 1, 0, 7},       {"idle-workers", 1, 0, 8},   {"idle-interval", 1, 0, 9},
        {"depth", 1, 0, 10},         {"wait", 0, 0, 11},          {"since-ns", 1, 0, 12},      {"foreground", 0, 0, 13},
        {"rate", 1, 0, 14},          {"poll", 1, 0, 15},
        {"help", 0, 0, 'h'},         {0, 0, 0, 0},
    };
    if (argc < 2 || argv[1][0] == '-')
        usage();
    opt.workload = argv[1];
    optind = 2;
    int ch;
    while ((ch = getopt_long(argc, argv, "H:p:c:k:n:w:s:f:t:h", lo, NULL)) != -1) {
        switch (ch) {
        case 'H': opt.host = optarg; break;
        case 'p': opt.port = optarg; break;
        case 'c': opt.clients = (int)parse_double(optarg, "clients"); break;
        case 'k': opt.workers = (int)parse_double(optarg, "workers"); break;
        case 'n': opt.jobs = (uint64_t)parse_double(optarg, "jobs"); break;
        case 'w': opt.window = (int)parse_double(optarg, "window"); break;
        case 's': opt.size = (int)parse_double(optarg, "size"); break;
        case 'f': opt.func = optarg; break;
        case 't': opt.timeout = parse_double(optarg, "timeout"); break;
        case 1: opt.label = optarg; break;
        case 2:
            if (!strcmp(optarg, "normal")) opt.priority = 0;
            else if (!strcmp(optarg, "high")) opt.priority = 1;
            else if (!strcmp(optarg, "low")) opt.priority = 2;
            else usage();
            break;
        case 3:
            if (!strcmp(optarg, "uniq")) opt.grab_uniq = 1;
            else if (!strcmp(optarg, "plain")) opt.grab_uniq = 0;
            else usage();
            break;
        case 4: opt.no_prefill = 1; break;
        case 5: opt.unique_prefix = optarg; break;
        case 6: opt.server_pid = (long)parse_double(optarg, "pid"); break;
        case 7: opt.duration = parse_double(optarg, "duration"); break;
        case 8: opt.idle_workers = (int)parse_double(optarg, "idle-workers"); break;
        case 9: opt.idle_interval = parse_double(optarg, "idle-interval"); break;
        case 10: opt.depth = (uint64_t)parse_double(optarg, "depth"); break;
        case 11: opt.wait = 1; break;
        case 12: opt.since_ns = (long long)parse_double(optarg, "since-ns"); break;
        case 13: opt.foreground = 1; break;
        case 14: opt.rate = parse_double(optarg, "rate"); break;
        case 15: opt.poll = parse_double(optarg, "poll"); break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();
    if (!strcmp(opt.workload, "freeport"))
        return wl_freeport();
    if (!opt.port)
        fail(3, "--port is required");
    if (!strcmp(opt.port, "4730"))
        fprintf(stderr, "loadgen: warning: port 4730 is production's port\n");
    if (opt.size < TAG_LEN || opt.window < 1 || strlen(opt.func) > 512 || opt.clients < 0 ||
        opt.workers < 0)
        fail(3, "bad sizes: size >= 16, window >= 1, function name <= 512 bytes");
    if (opt.unique_prefix) {
        if (strlen(opt.unique_prefix) > 40)
            fail(3, "--unique-prefix longer than 40 bytes");
        snprintf(g.prefix, sizeof g.prefix, "%s", opt.unique_prefix);
    } else {
        snprintf(g.prefix, sizeof g.prefix, "lg%x%llx", (unsigned)getpid(),
                 (unsigned long long)(now_ns() & 0xffffffffull));
    }
    g.t_start = now_ns();
    g.deadline = g.t_start + (uint64_t)(opt.timeout * 1e9);
    if (!strcmp(opt.workload, "status"))
        return wl_status();
    g.ep = epoll_create1(EPOLL_CLOEXEC);
    if (g.ep < 0)
        fail(1, "epoll_create1: %s", strerror(errno));
    if (!strcmp(opt.workload, "submit-bg") && opt.clients > 0)
        return wl_submit_bg();
    if (!strcmp(opt.workload, "drain") && opt.workers > 0 && (opt.clients > 0 || opt.no_prefill))
        return wl_drain();
    if (!strcmp(opt.workload, "roundtrip") && opt.clients > 0 && opt.workers > 0)
        return wl_roundtrip();
    if (!strcmp(opt.workload, "grab-latency") && opt.workers + opt.idle_workers > 0)
        return wl_grab_latency();
    if (!strcmp(opt.workload, "depth") && opt.clients > 0)
        return wl_depth();
    if (!strcmp(opt.workload, "bg-latency") && opt.clients > 0 && opt.workers > 0)
        return wl_bg_latency();
    usage();
}
