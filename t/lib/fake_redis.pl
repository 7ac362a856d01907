#!/usr/bin/perl

# fake_redis.pl: a Redis that answers the handshake (PING, AUTH, SELECT)
# as Redis does, and every other command with the reply given, as bytes:
# a hostile or broken Redis for the tests.  With --count FILE, the number
# of those other commands is kept in FILE.
#   fake_redis.pl --port N --reply '*2147483647\r\n'   (\r \n are escapes)

use strict;
use warnings;

use Getopt::Long qw(GetOptions);
use IO::Select;
use IO::Socket::INET;

my %opt;
GetOptions(\%opt, 'port=i', 'reply=s', 'count=s')
    or die "usage: $0 --port N --reply R [--count FILE]\n";
my $count = 0;

(my $reply = $opt{reply} // '') =~ s/\\r/\r/g;
$reply =~ s/\\n/\n/g;

my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
    LocalPort => $opt{port}, Listen => 64, ReuseAddr => 1, Proto => 'tcp')
    or die "listen: $!\n";

my $sel = IO::Select->new($listen);
my %in;

for (;;) {
    for my $fh ($sel->can_read) {
        if ($fh == $listen) {
            my $c = $listen->accept or next;
            $sel->add($c);
            $in{$c} = '';
            next;
        }

        my $n = sysread($fh, my $buf, 65536);
        if (!$n) {
            $sel->remove($fh);
            delete $in{$fh};
            close $fh;
            next;
        }

        $in{$fh} .= $buf;

        # whole commands: *N\r\n then N bulk strings
        while ($in{$fh} =~ /^\*(\d+)\r\n/) {
            my ($count, $at) = ($1, length $&);
            my @args;
            my $whole = 1;

            for (1 .. $count) {
                if (substr($in{$fh}, $at) !~ /^\$(\d+)\r\n/) {
                    $whole = 0;
                    last;
                }
                my ($len, $head) = ($1, length $&);
                if (length($in{$fh}) < $at + $head + $len + 2) {
                    $whole = 0;
                    last;
                }
                push @args, substr($in{$fh}, $at + $head, $len);
                $at += $head + $len + 2;
            }

            last unless $whole;
            substr($in{$fh}, 0, $at) = '';

            my $name = uc($args[0] // '');
            my $out = $name eq 'PING' ? "+PONG\r\n"
                    : $name eq 'AUTH' || $name eq 'SELECT' ? "+OK\r\n"
                    : $reply;
            syswrite($fh, $out);

            if ($out eq $reply && $opt{count}) {
                open my $c, '>', "$opt{count}.new" or next;
                print {$c} ++$count;
                close $c;
                rename "$opt{count}.new", $opt{count};
            }
        }
    }
}
