package Ratepool::Test;

# Ratepool::Test: the harness for ratepool's nginx tests, in the spirit of
# nginx-tests' Test::Nginx.  Each test file gets a temporary directory, a
# config template with %%MACROS%%, an nginx and mock providers that never
# outlive the test, and raw-socket HTTP helpers.  Core Perl only.
#
#   use lib 't/lib';
#   use Ratepool::Test;
#   my $t = Ratepool::Test->new;           # or ->new(module => 0)
#   my $mock = $t->start_mock(port => 1, config => { ... });
#   $t->write_config(<<'EOF');
#   %%TEST_GLOBALS%%
#   events {}
#   http { %%TEST_GLOBALS_HTTP%% ... listen 127.0.0.1:%%PORT_0%%; ... }
#   EOF
#   $t->try_run('ratepool is not usable');
#   my $r = $t->http(port => $t->port(0), path => '/v1/messages', ...);
#
# Environment: RATEPOOL_NGINX (binary), RATEPOOL_MODULE (.so),
# RATEPOOL_LEAVE=1 (keep the test directory), RATEPOOL_DEBUG_LOG=1
# (error_log at debug level).

use strict;
use warnings;

use Carp qw(croak);
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use POSIX qw(WNOHANG);
use Scalar::Util qw(weaken);
use Test::More;
use Time::HiRes qw(sleep time);

my $LIB  = abs_path(dirname(__FILE__) . '/..');      # t/lib
my $REPO = abs_path("$LIB/../..");
my $JSON = JSON::PP->new->utf8->canonical->allow_nonref;

# what AddressSanitizer and UBSan print (UBSan: "file:line: runtime error")
my $SANITIZER_REPORT = qr/Sanitizer|: runtime error: /;

my @INSTANCES;      # weak references, shut down in END

sub new {
    my ($class, %opt) = @_;

    my $module = exists $opt{module} ? $opt{module}
               : $ENV{RATEPOOL_MODULE}
                 // "$REPO/build/ngx_http_ratepool_module.so";

    my $self = bless {
        nginx  => $ENV{RATEPOOL_NGINX} // '/usr/sbin/nginx',
        module => $module || undef,
        ports  => {},
        mocks  => [],
        owner  => $$,
    }, $class;

    plan skip_all => "no nginx binary at $self->{nginx} (set RATEPOOL_NGINX)"
        unless -x $self->{nginx};
    plan skip_all => "module $self->{module} is not built"
                   . ' (build it or set RATEPOOL_MODULE)'
        if $self->{module} && !-f $self->{module};

    $self->{testdir} = tempdir('ratepool-test-XXXXXX', TMPDIR => 1,
                               CLEANUP => !$ENV{RATEPOOL_LEAVE});
    # workers run as nobody when tests run as root; they need to get in
    chmod 0755, $self->{testdir};
    diag "test directory $self->{testdir} is left behind"
        if $ENV{RATEPOOL_LEAVE};

    push @INSTANCES, $self;
    weaken $INSTANCES[-1];

    # an interrupted test still runs END, which stops nginx and the mocks
    my $owner = $$;
    for my $sig (qw(INT TERM HUP)) {
        $SIG{$sig} //= sub {
            POSIX::_exit(1) unless $$ == $owner;
            diag "interrupted by SIG$sig";
            exit 1;
        };
    }

    return $self;
}

sub testdir { $_[0]{testdir} }

# The n-th port: free when first asked for, then the same for this test.
sub port {
    my ($self, $n) = @_;

    return $self->{ports}{$n} if defined $self->{ports}{$n};

    my $port = $self->_free_port;
    return $self->{ports}{$n} = $port;
}

sub _free_port {
    my ($self) = @_;
    my %taken = map { $_ => 1 } values %{ $self->{ports} },
                                @{ $self->{extra_ports} ||= [] };

    for (1 .. 200) {
        # below Linux's ephemeral range, so outgoing connections don't take it
        my $port = 20000 + int rand 12000;
        next if $taken{$port};
        my $probe = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $port, Proto => 'tcp', Listen => 1, ReuseAddr => 1)
            or next;
        close $probe;
        return $port;
    }

    die "no free TCP port found on 127.0.0.1\n";
}

sub write_file {
    my ($self, $name, $content) = @_;

    open my $fh, '>', "$self->{testdir}/$name"
        or die "cannot write $name: $!\n";
    print {$fh} $content;
    close $fh;
}

sub write_config {
    my ($self, $text) = @_;
    my $dir = $self->{testdir};
    my $level = $ENV{RATEPOOL_DEBUG_LOG} ? 'debug' : 'info';

    my $globals = join '',
        ($self->{module} ? "load_module $self->{module};\n" : ''),
        "pid $dir/nginx.pid;\n",
        "error_log $dir/error.log $level;\n",
        "worker_processes 2;\n",
        "daemon off;\n";

    my $globals_http = "access_log $dir/access.log;\n"
        . join '', map { "${_}_temp_path $dir/${_}_temp;\n" }
                   qw(client_body proxy fastcgi uwsgi scgi);

    $text =~ s/%%TEST_GLOBALS_HTTP%%/$globals_http/g;
    $text =~ s/%%TEST_GLOBALS%%/$globals/g;
    $text =~ s/%%PORT_(\d+)%%/$self->port($1)/ge;
    $text =~ s/%%TESTDIR%%/$dir/g;

    $self->write_file('nginx.conf', $text);
    $self->{config} = $text;
}

# --- nginx processes ---------------------------------------------------------

# Starts nginx in the foreground (daemon off, so we hold the master's pid),
# then waits for the pid file and for every listen port to accept.
sub run {
    my ($self) = @_;
    my $dir = $self->{testdir};

    die "nginx is already running\n" if $self->{pid};
    die "write_config() first\n" unless defined $self->{config};

    unlink "$dir/nginx.pid";
    # a sanitizer build of the module needs its runtime loaded first
    local $ENV{LD_PRELOAD} = $ENV{RATEPOOL_PRELOAD}
        if $ENV{RATEPOOL_PRELOAD};

    my $pid = _spawn("$dir/stderr.log", $self->{nginx},
                     '-p', "$dir/", '-c', 'nginx.conf', '-e', "$dir/error.log");
    $self->{pid} = $pid;

    my @ports = $self->{config}
        =~ /(?:^|[;{])\s*listen\s+(?:\S+:)?(\d+)\b/mg;

    my $deadline = time + 10;
    while (time < $deadline) {
        if (defined(my $status = _exited($pid))) {
            delete $self->{pid};
            die "nginx exited early with status " . ($status >> 8) . ":\n"
                . $self->_log_tail;
        }
        return $self if -s "$dir/nginx.pid"
                     && !grep { !_accepts($_) } @ports;
        sleep 0.05;
    }

    my $tail = $self->_log_tail;
    $self->stop;
    die "nginx did not come up within 10 s:\n$tail";
}

sub try_run {
    my ($self, $reason) = @_;

    return $self if eval { $self->run; 1 };

    diag $@;
    plan skip_all => $reason;
}

# `nginx -t` on the current config: (exit code, everything it printed).
sub nginx_test_config {
    my ($self) = @_;
    my $dir = $self->{testdir};
    my $out = "$dir/nginx-t.log";

    unlink $out;
    local $ENV{LD_PRELOAD} = $ENV{RATEPOOL_PRELOAD}
        if $ENV{RATEPOOL_PRELOAD};
    my $pid = _spawn($out, $self->{nginx}, '-t',
                     '-p', "$dir/", '-c', 'nginx.conf', '-e', $out);
    local $?;
    waitpid $pid, 0;
    my $code = $? >> 8;
    my $text = _slurp($out);

    # configuration is read here too: a sanitizer's report fails the test
    my @reports = grep { /$SANITIZER_REPORT/ } split /\n/, $text;
    ok(0, 'nginx -t has no sanitizer reports') or diag join "\n", @reports
        if @reports;

    return ($code, $text);
}

# HUP the master; true once a full set of new workers is up and the old
# ones are gone (false after ~3 s, e.g. when the new config was rejected).
sub reload {
    my ($self) = @_;
    my $master = $self->{pid} or die "nginx is not running\n";

    my %old = map { $_ => 1 } _children($master);
    kill HUP => $master;

    my $deadline = time + 3;
    while (time < $deadline) {
        my @now = _children($master);
        my @new = grep { !$old{$_} } @now;
        return 1 if @new >= keys %old && !grep { $old{$_} } @now;
        sleep 0.05;
    }

    return 0;
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;

    my @workers = _children($pid);
    kill QUIT => $pid;
    return if _reap($pid, 5);

    kill TERM => $pid;
    return if _reap($pid, 2);

    kill KILL => $pid, @workers;
    _reap($pid, 1);
}

# --- mock providers ----------------------------------------------------------

# port => n (< 1024: the n-th test port, else the port itself; default: a
# fresh port), config => {...}, log => 1, stream_delay_ms => n.
sub start_mock {
    my ($self, %opt) = @_;
    my $dir = $self->{testdir};
    my $n = @{ $self->{mocks} };

    my $port = !defined $opt{port} ? $self->_anonymous_port
             : $opt{port} < 1024   ? $self->port($opt{port})
             :                       $opt{port};

    my @args = ('--port', $port);
    if ($opt{config}) {
        $self->write_file("mock$n.json", $JSON->encode($opt{config}));
        push @args, '--config', "$dir/mock$n.json";
    }
    push @args, '--log', "$dir/mock$n.jsonl" if $opt{log};
    push @args, '--stream-delay-ms', $opt{stream_delay_ms}
        if defined $opt{stream_delay_ms};

    my $stderr = "$dir/mock$n.stderr";
    my $pid = _spawn($stderr, $^X, "$LIB/mock_provider.pl", @args);

    my $mock = Ratepool::Test::Mock->new(pid => $pid, port => $port,
        log_file => $opt{log} ? "$dir/mock$n.jsonl" : undef);
    push @{ $self->{mocks} }, $mock;

    for (1 .. 100) {
        return $mock if _accepts($port);
        last if defined _exited($pid);
        sleep 0.05;
    }

    $mock->stop;
    die "mock provider did not start on port $port:\n" . _slurp($stderr);
}

# --- redis ---------------------------------------------------------------------

# A real redis-server of its own, on 127.0.0.1 (port => n as for mocks),
# with password => P if given, and a unix socket too with unix => 1.
# Skips the test when there is none.
sub start_redis {
    my ($self, %opt) = @_;

    my $server = $ENV{RATEPOOL_REDIS_SERVER} // '/usr/bin/redis-server';
    plan skip_all => "no redis-server at $server" unless -x $server;

    my $port = !defined $opt{port} ? $self->_anonymous_port
             : $opt{port} < 1024   ? $self->port($opt{port})
             :                       $opt{port};

    my $redis = Ratepool::Test::Redis->new(server => $server, port => $port,
        password => $opt{password}, dir => $self->{testdir},
        unix => $opt{unix}, tls => $opt{tls},
        n => scalar @{ $self->{redis} ||= [] });
    push @{ $self->{redis} }, $redis;

    $redis->start;
    return $redis;
}

# True once every worker (worker_processes 2) of each gateway given is
# connected to Redis and Redis sees that many gateways alive; false if
# that takes more than 10 s.
#   ok(Ratepool::Test::redis_connected($a, $b), 'both gateways connect');
sub redis_connected {
    my (@gateways) = @_;
    my $deadline = time + 10;

    while (time < $deadline) {
        return 1 unless grep {
            my $store = $_->status->{store};
            ($store->{state} // '') ne 'up'
                || ($store->{connected_workers} // 0) < 2
                || ($store->{gateways} // 0) < @gateways
        } @gateways;
        sleep 0.1;
    }

    return 0;
}

sub _anonymous_port {
    my ($self) = @_;
    my $port = $self->_free_port;
    push @{ $self->{extra_ports} }, $port;
    return $port;
}

# --- clients -----------------------------------------------------------------

# One request over a fresh connection (Connection: close), read to EOF.
# Arguments: port (required), method, path, headers (hashref, or arrayref of
# name/value pairs in order), body (a string, or a reference sent as JSON),
# timeout (s, default 10).  Returns { status, headers, raw_headers, body },
# plus error when the connection failed or timed out.
sub http {
    my ($self, %args) = @_;

    my $r = http_request(%args);
    delete @$r{qw(chunks first_byte_ms last_byte_ms)};
    return $r;
}

# n random bytes as hex: unique secrets and tokens, so that a scan of
# logs for them means something.
sub random_hex {
    my ($n) = @_;
    return join '', map { sprintf '%02x', int rand 256 } 1 .. $n;
}

# The status endpoint's JSON, decoded ({} if it is not JSON).
sub status {
    my ($self, %args) = @_;

    my $r = $self->http(port => $args{port} // $self->port(0),
                        path => $args{path} // '/ratepool/status');
    return eval { decode_json($r->{body}) } || {};
}

# A list of named things from the status as a hash by name.
sub by_name {
    my ($list) = @_;
    return { map { $_->{name} => $_ } @{ $list || [] } };
}

# A file of the test directory ('' if it is not there).
sub read_file {
    my ($self, $name) = @_;
    return _slurp("$self->{testdir}/$name");
}

# The value ratepool_client wants for a gateway token.
sub token_hash {
    my ($self, $token) = @_;

    require Digest::SHA;
    return 'sha256:' . Digest::SHA::sha256_hex($token);
}

# A Messages API request as Claude Code sends it: token => the gateway
# token (as x-api-key, or as a bearer token with bearer => 1), headers =>
# extra headers, body => fields merged into a small valid request.
sub messages {
    my ($self, %args) = @_;

    my $token = $args{token};
    my @auth = !defined $token ? ()
             : $args{bearer} ? (Authorization => "Bearer $token")
             : ('x-api-key' => $token);
    my $body = $args{body};

    if (!defined $body || ref $body eq 'HASH') {
        $body = { model => 'claude-sonnet-4-6', max_tokens => 64,
                  messages => [ { role => 'user', content => 'Hello' } ],
                  %{ $body || {} } };
    }

    my %request = (
        port    => $args{port} // $self->port(0),
        method  => 'POST',
        path    => $args{path} // '/v1/messages',
        headers => [ @auth, 'anthropic-version' => '2023-06-01',
                     @{ $args{headers} || [] } ],
        body    => $body,
    );
    $request{timeout} = $args{timeout} if $args{timeout};

    return $args{stream} ? $self->http_stream(%request)
                         : $self->http(%request);
}

# Like http, plus chunks => [[ms, bytes], ...] (one per read, ms since the
# request was sent), first_byte_ms and last_byte_ms.
sub http_stream {
    my ($self, %args) = @_;
    return http_request(%args);
}

sub http_request {
    my (%args) = @_;

    my $port = $args{port} or croak 'http: port => $t->port(N) is required';
    my $method = $args{method} // 'GET';
    my $body = $args{body};

    my @headers = ref $args{headers} eq 'HASH'
        ? map { ($_ => $args{headers}{$_}) } sort keys %{ $args{headers} }
        : @{ $args{headers} || [] };
    my %given = map { lc($headers[$_]) => 1 } grep { !($_ % 2) } 0 .. $#headers;

    if (ref $body) {
        $body = $JSON->encode($body);
        push @headers, 'Content-Type' => 'application/json'
            unless $given{'content-type'};
    }

    unshift @headers, Host => "127.0.0.1:$port" unless $given{host};
    push @headers, 'Content-Length' => length $body
        if defined $body && !$given{'content-length'}
                         && !$given{'transfer-encoding'};
    push @headers, Connection => 'close' unless $given{connection};

    my $request = "$method " . ($args{path} // '/') . " HTTP/1.1\r\n";
    while (my ($name, $value) = splice @headers, 0, 2) {
        $request .= "$name: $value\r\n";
    }
    $request .= "\r\n" . ($body // '');

    local $SIG{PIPE} = 'IGNORE';

    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5)
        or return { status => 0, error => "connect to port $port: $@" };

    my $t0 = time;
    my $deadline = $t0 + ($args{timeout} // 10);
    my $sel = IO::Select->new($s);
    my $raw = '';
    my @chunks;
    my ($error, $write_error);

    # a server may answer early (413) and close: then read what it said;
    # split_at => N sends the first N bytes of the body, then the rest
    # after pause => seconds, as a slow client would
    my @parts = ($request);
    if (defined $args{split_at} && defined $body) {
        my $at = length($request) - length($body) + $args{split_at};
        @parts = (substr($request, 0, $at), substr($request, $at));
    }

    PART: for my $i (0 .. $#parts) {
        sleep($args{pause} // 0.2) if $i;
        for (my $sent = 0; $sent < length $parts[$i]; ) {
            my $n = syswrite($s, $parts[$i], 65536, $sent);
            if (!defined $n) {
                $write_error = "write: $!";
                last PART;
            }
            $sent += $n;
        }
    }

    while (!$error) {
        my $left = $deadline - time;
        if ($left <= 0) {
            $error = 'timeout';
            last;
        }
        next unless $sel->can_read($left);
        my $n = sysread($s, my $buf, 65536);
        last unless $n;
        push @chunks, [ (time - $t0) * 1000, $buf ];
        $raw .= $buf;
    }
    close $s;

    $error //= $write_error unless length $raw;
    my $r = parse_response($raw, $method);
    $r->{error} = $error if $error;
    $r->{chunks} = \@chunks;
    $r->{first_byte_ms} = @chunks ? $chunks[0][0] : undef;
    $r->{last_byte_ms} = @chunks ? $chunks[-1][0] : undef;

    return $r;
}

sub parse_response {
    my ($raw, $method) = @_;

    my ($head, $body) = split /\r\n\r\n/, $raw, 2;
    $body //= '';

    my ($status_line, @lines) = split /\r\n/, $head // '';
    my ($status) = ($status_line // '') =~ m{^HTTP/\d\.\d\s+(\d{3})};

    my %headers;
    for (@lines) {
        my ($name, $value) = /^([^:]+):\s*(.*)$/ or next;
        $name = lc $name;
        $headers{$name} = exists $headers{$name}
                        ? "$headers{$name}, $value" : $value;
    }

    if ($method eq 'HEAD' || ($status // 0) =~ /^(?:1..|204|304)$/) {
        $body = '';
    } elsif (($headers{'transfer-encoding'} // '') =~ /chunked/i) {
        $body = dechunk($body);
    } elsif (defined $headers{'content-length'}) {
        $body = substr($body, 0, $headers{'content-length'});
    }

    return { status => $status // 0, headers => \%headers,
             raw_headers => $head // '', body => $body };
}

# Decodes as much of a chunked body as arrived.
sub dechunk {
    my ($data) = @_;
    my $out = '';

    while ($data =~ s/\A([0-9a-fA-F]+)[^\r\n]*\r\n//) {
        my $size = hex $1 or last;
        $out .= substr($data, 0, $size, '');
        $data =~ s/\A\r\n//;
    }

    return $out;
}

# Load during an event (a failover): 4 clients, one after another each,
# Messages requests with $token through @$gateways in turn for $seconds.
# load_end() waits for them and returns the statuses and the longest
# request, in seconds.
sub load_start {
    my ($self, $gateways, $token, $seconds) = @_;
    my $until = time + $seconds;
    my @load;

    for my $i (0 .. 3) {
        my $g = $gateways->[$i % @$gateways];
        my $file = "$self->{testdir}/load$i";
        my $pid = fork // die "fork: $!\n";

        if (!$pid) {
            open my $out, '>', $file or POSIX::_exit(1);
            while (time < $until) {
                my $t0 = time;
                my $r = $g->messages(token => $token, timeout => 10);
                printf $out "%d %.3f\n", $r->{status}, time - $t0;
            }
            close $out;
            POSIX::_exit(0);
        }

        push @load, [ $pid, $file ];
    }

    return \@load;
}

sub load_end {
    my ($self, $load) = @_;
    my (@statuses, $longest);

    for (@$load) {
        my ($pid, $file) = @$_;
        waitpid $pid, 0;
        open my $fh, '<', $file or next;
        while (<$fh>) {
            my ($status, $took) = split;
            push @statuses, $status;
            $longest = $took if !defined $longest || $took > $longest;
        }
    }

    return (\@statuses, $longest // 0);
}

# Runs $code->($i) for i in 0..n-1 in forked children, released together,
# and returns their (JSON-serializable) results in order; a child that
# died yields undef.  Children must not run Test::More assertions.
sub parallel {
    my ($self, $n, $code) = @_;
    my $start = time + 0.1 + 0.005 * $n;
    my @children;

    for my $i (0 .. $n - 1) {
        pipe(my $from_child, my $to_parent) or die "pipe: $!\n";
        my $pid = fork // die "fork: $!\n";

        if (!$pid) {
            close $from_child;
            sleep($start - time) if $start > time;
            my $out = eval { $JSON->encode({ value => scalar $code->($i) }) }
                   // $JSON->encode({ error => "$@" });
            print {$to_parent} $out;
            close $to_parent;
            POSIX::_exit(0);
        }

        close $to_parent;
        push @children, [ $pid, $from_child ];
    }

    my @results;
    for my $child (@children) {
        my ($pid, $fh) = @$child;
        my $out = eval { $JSON->decode(do { local $/; <$fh> }) }
               // { error => "no result: $@" };
        { local $?; waitpid $pid, 0 }
        diag "parallel child failed: $out->{error}" if exists $out->{error};
        push @results, $out->{value};
    }

    return \@results;
}

# --- logs --------------------------------------------------------------------

sub error_log  { _slurp("$_[0]{testdir}/error.log") }
sub access_log { _slurp("$_[0]{testdir}/access.log") }

# Two tests; nginx's own stderr is read too, where sanitizers report.
sub check_log {
    my ($self) = @_;
    my @lines = split /\n/, $self->error_log
                            . _slurp("$self->{testdir}/stderr.log");

    my @alerts = grep { /\[(?:alert|emerg)\]/ } @lines;
    ok(!@alerts, 'the error log has no alerts or emergencies')
        or diag join "\n", @alerts;

    my @reports = grep { /$SANITIZER_REPORT/ } @lines;
    ok(!@reports, 'the error log has no sanitizer reports')
        or diag join "\n", @reports;
}

sub _log_tail {
    my ($self) = @_;
    my @lines = split /\n/, $self->error_log
                            . _slurp("$self->{testdir}/stderr.log");
    my $from = @lines > 30 ? @lines - 30 : 0;
    return join '', map { "$_\n" } @lines[ $from .. $#lines ];
}

# --- teardown ----------------------------------------------------------------

sub _shutdown {
    my ($self) = @_;

    return unless $$ == $self->{owner};
    local ($?, $!, $@);
    $self->stop;
    $_ && $_->stop for @{ $self->{mocks} };
    $_ && $_->stop for @{ $self->{redis} || [] };
}

sub DESTROY { $_[0]->_shutdown }

END {
    local $?;
    $_ && $_->_shutdown for @INSTANCES;
}

# --- process helpers ---------------------------------------------------------

# fork+exec with stdout and stderr appended to $output.
sub _spawn {
    my ($output, @cmd) = @_;

    my $pid = fork // die "fork: $!\n";
    return $pid if $pid;

    open STDOUT, '>>', $output or POSIX::_exit(126);
    open STDERR, '>&', \*STDOUT or POSIX::_exit(126);
    exec { $cmd[0] } @cmd or POSIX::_exit(127);
}

# The wait status once child $pid has exited (-1 if it is no child of
# ours), undef while it runs.  Leaves $? alone: a stray -1 there would
# become the exit code of a test that dies.
sub _exited {
    my ($pid) = @_;

    local $?;
    my $r = waitpid($pid, WNOHANG);
    return $r == $pid ? $? : $r == -1 ? -1 : undef;
}

sub _reap {
    my ($pid, $seconds) = @_;
    my $deadline = time + $seconds;

    while (time < $deadline) {
        return 1 if defined _exited($pid);
        sleep 0.05;
    }

    return 0;
}

# Live (not zombie) child processes of $ppid, from /proc.
sub _children {
    my ($ppid) = @_;
    my @pids;

    opendir my $proc, '/proc' or return;
    for my $pid (grep { /^\d+$/ } readdir $proc) {
        my $stat = _slurp("/proc/$pid/stat");
        my ($state, $parent) = $stat =~ /\)\s+(\S)\s+(\d+)/ or next;
        push @pids, $pid if $parent == $ppid && $state ne 'Z';
    }

    return @pids;
}

sub _accepts {
    my ($port) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 1)
        or return 0;
    close $s;
    return 1;
}

sub _slurp {
    my ($file) = @_;
    open my $fh, '<', $file or return '';
    local $/;
    return scalar <$fh>;
}

package Ratepool::Test::Mock;

# A running t/lib/mock_provider.pl, steered through its /_mock/ endpoints.

use strict;
use warnings;

use JSON::PP;

sub new {
    my ($class, %fields) = @_;
    return bless { %fields, owner => $$ }, $class;
}

sub port     { $_[0]{port} }
sub pid      { $_[0]{pid} }
sub log_file { $_[0]{log_file} }
sub url      { "http://127.0.0.1:$_[0]{port}" }

# Queues @$actions for requests made with credential $key; with
# sticky => 1 the last action repeats forever.
sub script {
    my ($self, $key, $actions, %opt) = @_;

    $self->_control('/_mock/script', {
        key     => $key,
        actions => $actions,
        sticky  => $opt{sticky} ? JSON::PP::true : JSON::PP::false,
    });
}

sub reset      { $_[0]->_control('/_mock/reset', {}) }
sub set_config { $_[0]->_control('/_mock/config', $_[1]) }

# Every request seen on /v1/*, oldest first.
sub log {
    my ($self) = @_;

    my $r = Ratepool::Test::http_request(port => $self->{port},
                                         path => '/_mock/log');
    die "mock log: status $r->{status}\n" unless $r->{status} == 200;
    return $JSON->decode($r->{body});
}

sub _control {
    my ($self, $path, $data) = @_;

    my $r = Ratepool::Test::http_request(port => $self->{port},
        method => 'POST', path => $path, body => $data);
    die "mock $path: status $r->{status}: $r->{body}\n"
        unless $r->{status} == 200;
    return 1;
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;

    return unless $$ == $self->{owner};
    kill TERM => $pid;
    return if Ratepool::Test::_reap($pid, 3);
    kill KILL => $pid;
    Ratepool::Test::_reap($pid, 1);
}

sub DESTROY {
    local ($?, $!, $@);
    $_[0]->stop;
}

package Ratepool::Test::Redis;

# A redis-server that a test may stop and start again on the same port.

use strict;
use warnings;

use Time::HiRes qw(sleep);

sub new {
    my ($class, %fields) = @_;
    return bless { %fields, owner => $$ }, $class;
}

sub port { $_[0]{port} }
sub socket { "$_[0]{dir}/redis$_[0]{n}.sock" }

sub start {
    my ($self) = @_;

    my @args = ('--port', $self->{port}, '--bind', '127.0.0.1',
                '--save', '', '--appendonly', 'no',
                '--dir', $self->{dir}, '--daemonize', 'no');

    # tls => { cert => FILE, key => FILE, ca => FILE, clients => 0|1 }:
    # TLS only, on the port (the plain one is off), client certificates
    # asked for with clients => 1
    if (my $tls = $self->{tls}) {
        @args[0, 1] = ('--port', 0);
        push @args, '--tls-port', $self->{port},
            '--tls-cert-file', $tls->{cert}, '--tls-key-file', $tls->{key},
            '--tls-ca-cert-file', $tls->{ca},
            '--tls-auth-clients', $tls->{clients} ? 'yes' : 'no';
    }
    push @args, '--requirepass', $self->{password}
        if defined $self->{password};
    push @args, '--unixsocket', $self->socket, '--unixsocketperm', '777'
        if $self->{unix};

    my $log = "$self->{dir}/redis$self->{n}.log";
    $self->{pid} = Ratepool::Test::_spawn($log, $self->{server}, @args);

    for (1 .. 100) {
        return $self if Ratepool::Test::_accepts($self->{port});
        last if defined Ratepool::Test::_exited($self->{pid});
        sleep 0.05;
    }

    die "redis-server did not start on port $self->{port}:\n"
        . Ratepool::Test::_slurp($log);
}

# a Redis that hangs (SIGSTOP), and goes on (SIGCONT)
sub pause  { kill STOP => $_[0]{pid} }
sub resume { kill CONT => $_[0]{pid} }
sub pid    { $_[0]{pid} }

# redis-cli's answer to a command, as text
sub cli {
    my ($self, @cmd) = @_;

    my @auth = defined $self->{password}
             ? ('--no-auth-warning', '-a', $self->{password}) : ();
    my $tls = $self->{tls};
    push @auth, '--tls', '--cacert', $tls->{ca},
        $tls->{client_cert} ? ('--cert', $tls->{client_cert},
                               '--key', $tls->{client_key}) : ()
        if $tls;
    open my $fh, '-|', 'redis-cli', '-p', $self->{port}, @auth, @cmd
        or die "redis-cli: $!\n";
    local $/;
    my $out = <$fh>;
    close $fh;
    return $out // '';
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;

    return unless $$ == $self->{owner};
    kill CONT => $pid;
    kill TERM => $pid;
    return if Ratepool::Test::_reap($pid, 3);
    kill KILL => $pid;
    Ratepool::Test::_reap($pid, 1);
}

sub DESTROY {
    local ($?, $!, $@);
    $_[0]->stop;
}

1;
