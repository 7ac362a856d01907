#!/usr/bin/perl

# Requests that end badly give back what they hold: whether the client
# goes away while the provider thinks or mid-stream, the provider times
# out, the client's body is cut short, or nginx reloads under a slow
# request, the key, its org and the totals show nothing in flight
# afterwards, and the gateway goes on answering.

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use POSIX ();
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;

my %SECRET = map { $_ => 'sk-ant-mock-' . random_hex(16) } qw(a1 b1);
my $TOKEN = 'gw-abort-' . random_hex(16);

my $mock = $t->start_mock(port => 1, config => {
    keys => { map { $SECRET{$_} => { org => "org-$_", name => $_ } }
              keys %SECRET },
    orgs => { map { ("org-$_" => { rpm => 1000 }) } keys %SECRET },
});

$t->write_file("$_.key", "$SECRET{$_}\n") for keys %SECRET;

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format abort '\$status key=\$ratepool_key tries=\$ratepool_tries '
                     'left=\$ratepool_client_left '
                     'rt=\$request_time "\$request"';

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_key a1 org=org-a1 server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/a1.key;
        ratepool_key b1 org=org-b1 server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/b1.key;
        keepalive 8;
    }

    ratepool_workspace backend;
    ratepool_client backend sha256:${\ sha256_hex($TOKEN) };

    server {
        listen 127.0.0.1:%%PORT_0%%;
        access_log %%TESTDIR%%/gateway.log abort;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }

    # the same pool, behind a provider that may take 1 s at most
    server {
        listen 127.0.0.1:%%PORT_2%%;
        access_log %%TESTDIR%%/gateway.log abort;
        proxy_read_timeout 1s;

        location /v1/ {
            ratepool_pass http://claude;
        }
    }
}
EOF

$t->run;

# --- helpers ----------------------------------------------------------------

sub status {
    my $s = $t->status;
    my $pool = $s->{pools}[0] || {};
    $s->{key} = Ratepool::Test::by_name($pool->{keys});
    $s->{org} = Ratepool::Test::by_name($pool->{orgs});
    return $s;
}

# every in-flight count of the status, as "where=n", for messages
sub in_flight {
    my ($s) = @_;
    return join ' ', "totals=" . ($s->{totals}{in_flight} // 'undef'),
        (map { "$_=" . ($s->{key}{$_}{in_flight} // 'undef') }
             sort keys %{ $s->{key} }),
        (map { "$_=" . ($s->{org}{$_}{in_flight} // 'undef') }
             sort keys %{ $s->{org} });
}

sub held {
    my ($s) = @_;
    return $s->{totals}{in_flight} // -1;
}

# polls the status until nothing is in flight: seconds it took, or undef
sub wait_released {
    my ($seconds) = @_;
    my $t0 = time;

    while (time - $t0 < $seconds) {
        return time - $t0 if in_flight(status()) eq in_flight_zero();
        sleep 0.05;
    }

    return undef;
}

sub in_flight_zero {
    return 'totals=0 a1=0 b1=0 org-a1=0 org-b1=0';
}

# tests that nothing is held and the gateway still answers
sub released_and_serving {
    my ($what, $within) = @_;

    my $took = wait_released($within);
    ok(defined $took, "$what: nothing is left in flight, keys and orgs "
                    . "included, within $within s")
        or diag in_flight(status());

    my $r = $t->messages(token => $TOKEN);
    is($r->{status}, 200, "$what: the next request is answered");
    is(held(status()), 0, "$what: and leaves nothing in flight");

    return $took;
}

sub body_json {
    my (%fields) = @_;
    return encode_json({ model => 'claude-sonnet-4-6', max_tokens => 64,
        messages => [ { role => 'user', content => 'Hello' } ], %fields });
}

# a raw connection with a request written, all of it or only its head
# and the first $partial bytes of its body
sub raw_request {
    my (%args) = @_;
    my $body = $args{body} // body_json();
    my $port = $args{port} // $t->port(0);

    my $head = "POST /v1/messages HTTP/1.1\r\n"
        . "Host: 127.0.0.1:$port\r\n"
        . "x-api-key: $TOKEN\r\n"
        . "anthropic-version: 2023-06-01\r\n"
        . "Content-Type: application/json\r\n"
        . "Content-Length: " . ($args{length} // length $body) . "\r\n"
        . join('', map { "$_->[0]: $_->[1]\r\n" } @{ $args{headers} || [] })
        . "\r\n";

    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port,
                                  Proto => 'tcp', Timeout => 5)
        or die "connect: $@\n";
    local $SIG{PIPE} = 'IGNORE';
    syswrite $s, $head . (defined $args{partial}
                          ? substr($body, 0, $args{partial}) : $body);
    return $s;
}

# reads from $s until $pattern matched what arrived, or $seconds passed
sub read_until {
    my ($s, $pattern, $seconds) = @_;
    my $sel = IO::Select->new($s);
    my $got = '';
    my $deadline = time + $seconds;

    while ($got !~ $pattern) {
        my $left = $deadline - time;
        last if $left <= 0 || !$sel->can_read($left);
        sysread($s, my $buf, 65536) or last;
        $got .= $buf;
    }

    return $got;
}

sub access_lines {
    open my $fh, '<', $t->testdir . '/gateway.log' or return ();
    return <$fh>;
}

is(in_flight(status()), in_flight_zero(), 'nothing is in flight at first');

# --- (a) the client goes away while the provider thinks ---------------------

my $s = raw_request(headers => [ [ 'x-mock-delay-ms', 1500 ] ]);
sleep 0.2;

my $st = status();
is(held($st), 1, '(a) a request waiting for the provider is in flight');
my ($key_a) = grep { $st->{key}{$_}{in_flight} } keys %{ $st->{key} };
my $failed_a = $st->{key}{ $key_a // 'a1' }{responses}{failed};

close $s;

my $took = wait_released(5);
ok(defined $took && $took < 1.0,
    '(a) when the client disconnects it is released at once, not when the '
    . 'provider answers 1.3 s later')
    or diag sprintf 'released after %s s: %s',
        defined $took ? sprintf('%.2f', $took) : 'never', in_flight(status());
is(status()->{key}{ $key_a // 'a1' }{responses}{failed}, $failed_a,
    '(a) a client that goes away is not counted against the key');
my ($line_a) = grep { /"POST \/v1\/messages/ } access_lines();
like($line_a // '', qr/^499 key=$key_a tries=1 /,
    '(a) the gateway logs 499, client closed request, with the key');
released_and_serving('(a)', 3);

# --- (b) the client goes away mid-stream -----------------------------------

$s = raw_request(body => body_json(stream => JSON::PP::true),
                 headers => [ [ 'x-mock-stream-delay-ms', 200 ] ]);

my $got = read_until($s, qr/\r\n\r\n.*event: message_start/s, 3);
like($got, qr{^HTTP/1\.1 200 .*\r\n\r\n.*event: message_start}s,
    '(b) the stream starts');
is(held(status()), 1, '(b) the streaming request is in flight');

close $s;

# the whole stream takes about 10 pieces of 200 ms
$took = wait_released(5);
ok(defined $took && $took < 1.0,
    '(b) a client that leaves mid-stream is released within a piece or two,'
    . ' not when the stream would end')
    or diag sprintf 'released after %s s: %s',
        defined $took ? sprintf('%.2f', $took) : 'never', in_flight(status());
released_and_serving('(b)', 3);
my @lines = grep { /"POST \/v1\/messages/ } access_lines();
is(scalar(grep { /^200 key=\S+ tries=1 left=1 / } @lines), 1,
    '(b) the log marks the client that left mid-stream, after its 200');
like($lines[-1] // '', qr/^200 .* left=0 /,
    '(b) and not the requests after it');

# --- (c) the provider times out ---------------------------------------------

# (c) a key times out: after proxy_read_timeout (1 s) the provider may be
# at work on the request, so it is not sent again with another key (that
# would pay for it twice); the client gets a 504 in the provider's format

$mock->reset;
$st = status();
my %failed = map { $_ => $st->{key}{$_}{responses}{failed} } qw(a1 b1);

my $t0 = time;
my $r = $t->messages(token => $TOKEN, port => $t->port(2), timeout => 15,
                     headers => [ 'x-mock-delay-ms' => 3000 ]);
my $elapsed = time - $t0;
my $log = $mock->log;
my $err = eval { decode_json($r->{body}) } || {};

is($r->{status}, 504, '(c) a request that times out gets 504');
is($err->{error}{type}, 'timeout_error', '(c) as a timeout_error');
like($r->{headers}{'content-type'}, qr{^application/json},
    '(c) in JSON, not nginx\'s HTML page');
is($r->{headers}{'x-should-retry'}, 'true', '(c) which the client may retry');
ok($elapsed > 0.9 && $elapsed < 2.0, '(c) after one read timeout of 1 s')
    or diag sprintf 'took %.2f s', $elapsed;
is(scalar @$log, 1, '(c) the request was sent once, with one key');

$st = status();
my $slow = $log->[0]{key_name} // '';
is($st->{key}{$slow}{responses}{failed}, $failed{$slow} + 1,
    '(c) that key counts the timeout as failed');
released_and_serving('(c)', 2);

# --- (d) the client's body is cut short ------------------------------------

$mock->reset;

$s = raw_request(length => 1000, partial => 10);
sleep 0.2;
my $held_d = held(status());
close $s;

$took = wait_released(3);
ok(defined $took, '(d) a request whose body never arrives is released')
    or diag "in flight while the body was awaited: $held_d; now: "
          . in_flight(status());
is(scalar @{ $mock->log }, 0, '(d) and never reached the provider');
released_and_serving('(d)', 2);

# --- (e) nginx reloads under a slow request --------------------------------

pipe(my $from_child, my $to_parent) or die "pipe: $!\n";
my $pid = fork // die "fork: $!\n";

if (!$pid) {
    close $from_child;
    my $res = $t->messages(token => $TOKEN, timeout => 10,
                           headers => [ 'x-mock-delay-ms' => 1500 ]);
    print {$to_parent} encode_json({ status => $res->{status},
                                     body => $res->{body} });
    close $to_parent;
    POSIX::_exit(0);
}

close $to_parent;

my $deadline = time + 3;
sleep 0.05 until held(status()) == 1 || time > $deadline;
is(held(status()), 1, '(e) a slow request is in flight');

ok($t->reload, '(e) nginx reloads while it is in flight, the old worker '
             . 'finishing it');

my $child = eval { decode_json(do { local $/; <$from_child> }) } || {};
waitpid $pid, 0;

is($child->{status}, 200, '(e) the slow request completes with 200');
like(eval { decode_json($child->{body})->{content}[0]{text} } // '',
    qr/^Hello from [ab]1$/, '(e) with the provider\'s answer');
released_and_serving('(e)', 2);

$t->stop;
$t->check_log;

done_testing;
