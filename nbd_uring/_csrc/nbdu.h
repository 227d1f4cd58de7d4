/* Declarations shared by cffi's cdef and the C compiler: no preprocessor directives here. */

struct nbdu_ring;
struct __kernel_timespec;

struct nbdu_ring *nbdu_ring_new(unsigned entries, unsigned flags, int *err);
void nbdu_ring_free(struct nbdu_ring *r);
int nbdu_register_eventfd(struct nbdu_ring *r, int efd, int async_only);
int nbdu_eventfd_enable(struct nbdu_ring *r, int enabled);
unsigned nbdu_cq_ready(struct nbdu_ring *r);
unsigned nbdu_cq_entries(struct nbdu_ring *r);
unsigned nbdu_sq_entries(struct nbdu_ring *r);
int nbdu_opcode_supported(struct nbdu_ring *r, int op);

int nbdu_prep_read(struct nbdu_ring *r, int fd, void *buf, unsigned len, uint64_t off,
                   uint64_t user_data);
int nbdu_prep_write(struct nbdu_ring *r, int fd, const void *buf, unsigned len, uint64_t off,
                    uint64_t user_data, int rw_flags);
int nbdu_prep_write_linked_fsync(struct nbdu_ring *r, int fd, const void *buf, unsigned len,
                                 uint64_t off, uint64_t write_user_data,
                                 uint64_t fsync_user_data);
int nbdu_prep_fsync(struct nbdu_ring *r, int fd, unsigned fsync_flags, uint64_t user_data);
int nbdu_prep_fallocate(struct nbdu_ring *r, int fd, int mode, uint64_t off, uint64_t len,
                        uint64_t user_data);
int nbdu_prep_fadvise(struct nbdu_ring *r, int fd, uint64_t off, unsigned len, int advice,
                      uint64_t user_data);

int nbdu_prep_timeout(struct nbdu_ring *r, struct __kernel_timespec *ts, uint64_t ns,
                      uint64_t user_data);

int nbdu_submit(struct nbdu_ring *r);
int nbdu_get_events(struct nbdu_ring *r);
int nbdu_work_pending(struct nbdu_ring *r);
int nbdu_deferred(struct nbdu_ring *r);
int nbdu_reap(struct nbdu_ring *r, uint64_t *user_data, int32_t *res, unsigned max,
              unsigned *lane_done);

/* The lane (lane.c): plain READs and WRITEs from request header to reply in C. */
struct nbdu_lane;
struct nbdu_lane_export;
struct nbdu_lane_conn;
enum { NBDU_LANE_REPLIES = 1, NBDU_LANE_FAILED = 2, NBDU_LANE_READY = 3 };
enum { NBDU_SERVE_IDLE = 0, NBDU_SERVE_PYTHON = 1, NBDU_SERVE_EOF = 2, NBDU_SERVE_YIELD = 3 };
struct nbdu_lane_tally {
    uint64_t bytes;    /* what a connection's lane requests hold of its budget */
    uint32_t requests;
    uint32_t partial;  /* a reply is partly sent */
};
struct nbdu_lane_export_state {
    uint32_t inflight;      /* lane reads and writes in flight */
    uint32_t exclusive;     /* set by Python while a write, trim or zeroing is admitted */
    uint32_t python_active; /* requests Python's tracker has admitted (no lane write then) */
};
struct nbdu_lane_event {
    unsigned kind;
    uint64_t token;
    uint64_t cookie;
    uint64_t offset;
    uint32_t length;
    int32_t err;
    uint32_t command;
    struct nbdu_lane_conn *conn;
};

struct nbdu_lane *nbdu_lane_new(struct nbdu_ring *r, unsigned *sqes_in_flight, size_t max_cached);
void nbdu_lane_free(struct nbdu_lane *lane);
void nbdu_lane_detach(struct nbdu_lane *lane);
unsigned nbdu_lane_inflight(struct nbdu_lane *lane);
unsigned nbdu_lane_take_prepared(struct nbdu_lane *lane);
unsigned nbdu_lane_events(struct nbdu_lane *lane, struct nbdu_lane_event *out, unsigned max);
unsigned nbdu_lane_pending_events(struct nbdu_lane *lane);

struct nbdu_lane_export *nbdu_lane_export_new(struct nbdu_lane *lane, int fd, uint64_t limit,
                                              int writable);
void nbdu_lane_export_close(struct nbdu_lane_export *e);
struct nbdu_lane_export_state *nbdu_lane_export_state(struct nbdu_lane_export *e);
int nbdu_lane_export_wait(struct nbdu_lane_export *e, uint64_t start, uint64_t end,
                          int exclusive, uint64_t token);
int nbdu_lane_export_flush_wait(struct nbdu_lane_export *e, uint64_t token);

struct nbdu_lane_conn *nbdu_lane_conn_new(struct nbdu_lane *lane, struct nbdu_lane_export *e,
                                          uint64_t token, uint64_t size, uint32_t max_block,
                                          uint32_t align_mask, uint32_t hole_check_from,
                                          uint64_t max_bytes, uint32_t max_requests);
void nbdu_lane_conn_close(struct nbdu_lane_conn *c);
struct nbdu_lane_tally *nbdu_lane_conn_tally(struct nbdu_lane_conn *c);
int nbdu_lane_feed(struct nbdu_lane_conn *c, const unsigned char *data, size_t pos, size_t end,
                   uint64_t other_bytes, unsigned other_requests, size_t *pos_out);
int nbdu_lane_send(struct nbdu_lane_conn *c, int fd);
int nbdu_lane_serve(struct nbdu_lane_conn *c, int fd, unsigned char *buf, size_t cap,
                    size_t *end_io, uint64_t poll_ns, unsigned max_rounds);
